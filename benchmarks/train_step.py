"""Throughput and peak memory of one full VRPO optimizer step, fused head against eager logits.

One step = ``VRPOTrainer.train_step``: keyed mask draws for a batch of pairs (chosen and rejected),
the policy's ELBO terms with gradients, the reference's on the same masks (antithetic, no
gradients), the VRPO + SFT loss, backward, clipping and the AdamW update; n = n_t = 8.

Two implementations of the same estimator, each in its own trainer built from the same seed:

* ``fused``: ``--fused_head`` (the default): ``elbo_terms(fused="auto")``, the model body gives
  hidden states and ``vrpo_kernels.masked_linear_ce(impl="auto")`` applies the LM head (``"torch"``
  on the CPU, ``"triton"`` on CUDA);
* ``eager``: ``fused_head=False``: the model returns full logits ``[N, L, V]`` and the log-softmax is
  taken at the masked positions.

Models: ``tiny`` is the embedded toy model (``vrpo.tasks.sort.task.MODEL_SHAPE``: d_model 64, 2 layers,
vocabulary 136) at the toy run's batch of 16 pairs; ``tiny-v32k`` is a slightly larger body (d_model
128) with a 32,768-token vocabulary, where the head dominates, at 4 pairs.

Timing: warm-up steps, then ``--reps`` repeats of the same step (same pairs, same draws), the
implementations interleaved (alternating order); median, p20 and p80 of the step time. Tokens/s =
the step's non-padding tokens x n samples x 2 models (policy and reference) / step time, the count the
trainer logs as ``train/tokens_per_s``. ``speedup`` = eager median / this median, from the same run;
``paired speedup`` = the median over rounds of eager time / this time within the round, which a
shared machine's slow spells (that hit whole rounds) disturb less.

Memory: on the CPU, each (model, implementation) runs in a fresh subprocess: one warm-up step (AdamW
state, lazy initialisation), then the peak resident set during a second step minus the resident set
before it (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; glibc's mmap threshold is pinned
so that freed tensors go back to the OS). On CUDA: ``torch.cuda.max_memory_allocated`` during the step
minus the memory allocated before it.

    python -m benchmarks.train_step            # ~2 CPU minutes
    python -m benchmarks.train_step --quick    # seconds, for the smoke test

Writes ``train_step.csv`` and ``train_step.md`` under ``--out`` (default ``benchmarks/results``; a
``--quick`` run without ``--out`` writes to a temporary folder, never over the committed results).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import (
    RESULTS,
    machine,
    median_p20_p80,
    memory_probe_env,
    output_dir,
    peak_extra_bytes,
    write_csv,
)
from vrpo.tasks.sort.task import MODEL_SHAPE as TOY_MODEL
from vrpo.training.config import VRPOConfig

MODELS = {
    "tiny": dict(model=TOY_MODEL, batch=16),
    "tiny-v32k": dict(
        model=dict(d_model=128, n_heads=4, n_layers=2, mlp_hidden_size=384, vocab_size=32768, max_sequence_length=128),
        batch=4,
    ),
}
IMPLS = {"fused": dict(fused_head=True, kernel_impl="auto"), "eager": dict(fused_head=False)}
FULL = dict(models=("tiny", "tiny-v32k"), reps=11, warmup=2, batch=None)
QUICK = dict(models=("tiny",), reps=2, warmup=1, batch=2)
N_T = 8


def build_trainer(model_name: str, impl: str, workdir: str, batch: int, seed: int, data=None):
    """A ``VRPOTrainer`` on the toy task for ``model_name`` with implementation ``impl``.

    ``data = (tokenizer, train_pairs)`` reuses a tokenization (same model config) instead of redoing it.
    """
    from vrpo.models import build_tiny_llada, build_tiny_tokenizer
    from vrpo.tasks.sort import SORT_TASK
    from vrpo.training import VRPOTrainer, loading

    spec = MODELS[model_name]["model"]
    cfg = VRPOConfig(
        task="sort",
        output_dir=workdir,
        overwrite_output_dir=True,
        report_to="none",
        num_samples=0,
        save_steps=0,
        seed=seed,
        eval_size=0,
        per_device_train_batch_size=batch,
        n_t=N_T,
        n_yt=1,
        max_steps=10_000,
        **IMPLS[impl],
    ).resolved(SORT_TASK.presets)
    if data is None:
        tokenizer = build_tiny_tokenizer(vocab_size=spec["vocab_size"])
        train_pairs, _, _ = loading.load_pairs(cfg, tokenizer, SORT_TASK)
        data = (tokenizer, train_pairs)
    tokenizer, train_pairs = data
    # The same initial weights for both implementations; the attention backend the trainer would pick.
    model = build_tiny_llada(seed=seed, attn_implementation=loading.attention_backend(cfg), **spec)
    trainer = VRPOTrainer(
        cfg, model=model, tokenizer=tokenizer, train_pairs=train_pairs, eval_pairs=None, task=SORT_TASK
    )
    return trainer, data


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(trainer) -> tuple[float, int]:
    """(seconds, tokens) of one optimizer step on step 0's pairs and draws."""
    _sync()
    t0 = time.perf_counter()
    applied, _, tokens = trainer.train_step(0)
    _sync()
    if not applied:
        raise RuntimeError("train_step: the step was skipped (non-finite loss or gradient norm)")
    return time.perf_counter() - t0, tokens


# --- memory -----------------------------------------------------------------------------------------


def step_memory(trainer, device: str = "cpu") -> int:
    """Bytes: the peak memory of one step above what was in use before it (call after a warm-up step)."""
    return peak_extra_bytes(lambda: trainer.train_step(0), device)


def memory_child(model_name: str, impl: str, batch: int, seed: int) -> dict:
    """Run in a fresh process: one warm-up step, then the RSS delta of a second one."""
    with tempfile.TemporaryDirectory(prefix="vrpo-train-step-") as workdir:
        trainer, _ = build_trainer(model_name, impl, workdir, batch, seed)
        trainer.train_step(0)
        return {"peak_mem_bytes": step_memory(trainer)}


def cpu_memory_in_subprocess(model_name: str, impl: str, batch: int, seed: int) -> int:
    env = memory_probe_env(131072)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        "--_memory_child",
        model_name,
        impl,
        "--batch",
        str(batch),
        "--seed",
        str(seed),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess {' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_bytes"]


# --- the benchmark ----------------------------------------------------------------------------------


def measure_model(model_name: str, batch: int, reps: int, warmup: int, seed: int, memory: bool = True) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    spec = MODELS[model_name]["model"]
    with tempfile.TemporaryDirectory(prefix="vrpo-train-step-") as workdir:
        trainers, data = {}, None
        for impl in IMPLS:
            trainers[impl], data = build_trainer(model_name, impl, os.path.join(workdir, impl), batch, seed, data)
        for _ in range(warmup):
            for trainer in trainers.values():
                timed_step(trainer)
        times = {impl: [] for impl in IMPLS}
        tokens = {}
        names = list(IMPLS)
        for r in range(reps):
            for impl in names if r % 2 == 0 else names[::-1]:
                dt, tokens[impl] = timed_step(trainers[impl])
                times[impl].append(dt)
        gpu_mem = {impl: step_memory(t, "cuda") for impl, t in trainers.items()} if on_gpu else {}
        from vrpo_kernels.dispatch import resolve_impl

        probe = next(trainers["fused"].policy_model.parameters())
        kernel = resolve_impl(trainers["fused"].config.kernel_impl, probe, "masked_linear_ce")
        del trainers
    gc.collect()
    rows = []
    for impl in IMPLS:
        med, p20, p80 = median_p20_p80(times[impl])
        if not memory:
            mem = None
        elif on_gpu:
            mem = gpu_mem[impl]
        else:
            mem = cpu_memory_in_subprocess(model_name, impl, batch, seed)
        rows.append(
            dict(
                model=model_name,
                vocab=spec["vocab_size"],
                d_model=spec["d_model"],
                layers=spec["n_layers"],
                impl=impl,
                head=f"masked_linear_ce(impl={kernel!r})" if impl == "fused" else "full logits [N, L, V]",
                batch_pairs=batch,
                n=N_T,
                tokens_per_step=tokens[impl],
                reps=reps,
                median_ms=med * 1e3,
                p20_ms=p20 * 1e3,
                p80_ms=p80 * 1e3,
                # The p20 of the throughput is the p80 of the time, and vice versa.
                tokens_per_s=tokens[impl] / med,
                tokens_per_s_p20=tokens[impl] / p80,
                tokens_per_s_p80=tokens[impl] / p20,
                peak_mem_bytes=mem,
                mem_method="cuda max_memory_allocated" if on_gpu else "RSS delta, fresh subprocess",
            )
        )
    eager = next(r for r in rows if r["impl"] == "eager")
    for r in rows:
        r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
        r["paired_speedup"] = statistics.median(e / t for e, t in zip(times["eager"], times[r["impl"]]))
        r["mem_vs_eager"] = (
            r["peak_mem_bytes"] / eager["peak_mem_bytes"] if memory and eager["peak_mem_bytes"] else None
        )
    return rows


CSV_COLUMNS = (
    "model",
    "vocab",
    "d_model",
    "layers",
    "impl",
    "head",
    "batch_pairs",
    "n",
    "tokens_per_step",
    "reps",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "tokens_per_s",
    "tokens_per_s_p20",
    "tokens_per_s_p80",
    "speedup_vs_eager",
    "paired_speedup",
    "peak_mem_bytes",
    "mem_vs_eager",
    "mem_method",
)


def _mib(x):
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def markdown(rows, meta) -> str:
    lines = [
        "# One VRPO training step: fused head vs eager logits",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}); {meta['seconds']:.0f} s in all.",
        "",
        "One `VRPOTrainer.train_step` (policy with gradients + frozen reference on the same masks, n = 8, "
        "VRPO + SFT loss, backward, AdamW) on the toy sorting task; the same step repeated, implementations "
        "interleaved; median [p20, p80]. Tokens = non-padding tokens x n x 2 models. Memory: "
        f"{rows[0]['mem_method']}.",
        "",
        "| model | vocab | impl | head | pairs | tokens/step | step time (ms) | tokens/s | speedup vs eager "
        "| paired speedup | peak memory | memory vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem_ratio = "n/a" if r["mem_vs_eager"] is None else f"{r['mem_vs_eager']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['vocab']} | {r['impl']} | `{r['head']}` | {r['batch_pairs']} "
            f"| {r['tokens_per_step']} "
            f"| {r['median_ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}] "
            f"| {r['tokens_per_s']:,.0f} [{r['tokens_per_s_p20']:,.0f}, {r['tokens_per_s_p80']:,.0f}] "
            f"| {r['speedup_vs_eager']:.2f}x | {r['paired_speedup']:.2f}x | {_mib(r['peak_mem_bytes'])} "
            f"| {mem_ratio} |"
        )
    lines += ["", f"{meta['reps']} timed repeats after {meta['warmup']} warm-up steps per implementation.", ""]
    return "\n".join(lines)


def run(
    out_dir=str(RESULTS),
    quick=False,
    models=None,
    reps=None,
    warmup=None,
    batch=None,
    seed=42,
    memory=True,
    command="python -m benchmarks.train_step",
) -> list[dict]:
    """Measure and write ``train_step.{csv,md}`` under ``out_dir``. Returns the rows."""
    sizes = dict(QUICK if quick else FULL)
    for key, value in dict(models=models, reps=reps, warmup=warmup, batch=batch).items():
        if value is not None:
            sizes[key] = value
    for name in sizes["models"]:
        if name not in MODELS:
            raise ValueError(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    if sizes["reps"] < 1 or sizes["warmup"] < 0:
        raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {sizes['reps']} and {sizes['warmup']}")
    t0 = time.perf_counter()
    rows = []
    for name in sizes["models"]:
        pairs = sizes["batch"] or MODELS[name]["batch"]
        rows += measure_model(name, pairs, sizes["reps"], sizes["warmup"], seed, memory)
    meta = dict(
        command=command,
        date=datetime.date.today().isoformat(),
        machine=machine(),
        seconds=time.perf_counter() - t0,
        **sizes,
    )
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "train_step.csv"), CSV_COLUMNS)
    with open(os.path.join(out_dir, "train_step.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, meta))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model at 2 pairs, 2 repeats (smoke test)")
    parser.add_argument(
        "--out", default=str(RESULTS), help="output directory (default: benchmarks/results; --quick: a temporary one)"
    )
    parser.add_argument("--models", nargs="+", default=None, help=f"of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--reps", type=int, default=None, help=f"timed repeats per implementation ({FULL['reps']})")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up steps per implementation ({FULL['warmup']})")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: per model, 16 and 4)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no_memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--_memory_child", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        model_name, impl = args._memory_child
        print(json.dumps(memory_child(model_name, impl, args.batch or MODELS[model_name]["batch"], args.seed)))
        return None
    args.out = output_dir(args.out, args.quick)
    argv_str = " ".join(["python -m benchmarks.train_step", *(argv if argv is not None else sys.argv[1:])])
    rows = run(
        args.out,
        args.quick,
        args.models,
        args.reps,
        args.warmup,
        args.batch,
        args.seed,
        memory=not args.no_memory,
        command=argv_str,
    )
    with open(os.path.join(args.out, "train_step.md"), encoding="utf-8") as f:
        print(f.read())
    return rows


if __name__ == "__main__":
    main()
