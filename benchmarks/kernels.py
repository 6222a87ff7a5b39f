"""Kernel benchmark: each op's implementations side by side, time, peak extra memory and error.

    python -m benchmarks.kernels                 # every op at its CPU shape (and GPU shape on CUDA)
    python -m benchmarks.kernels --quick         # toy sizes, seconds (what the smoke test runs)
    python -m benchmarks.kernels --ops masked_ce --repeats 5 --impls eager,vrpo_torch
    python -m benchmarks.kernels --device cuda    # the GPU rows only (no CPU rows first)
    python -m benchmarks.kernels --ops masks      # the keyed noisy inputs: former per-row path vs noisy_draw

Per op and shape, every implementation is timed with interleaved repeats (one call of each
implementation per round, the order rotating between rounds) after one warm-up call each (which is
where torch.compile compiles; its duration is reported as ``first_call_s``). On CUDA the timing is
``triton.testing.do_bench``. Columns: implementation, shape, median, p20 and p80 seconds, peak extra
memory, and the maximum absolute error of the output and the gradients against a float64
reference. Peak extra memory is measured on the CPU in a fresh subprocess per implementation: after
its warm-up call the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), then one call
runs and the peak RSS above the resting RSS is reported; glibc is told to return every allocation
over 64 KB to the OS on free (``MALLOC_MMAP_THRESHOLD_``), so buffers freed after the warm-up cannot
hide in the resting RSS. On CUDA it is ``torch.cuda.max_memory_allocated`` above the inputs.

Each implementation runs in its own try/except: one that fails (a peer that is not installed right,
an out-of-memory) is logged with its error and left out, and the others still run. The CPU results
say which CPU they come from: its model, its vector ISA (AVX2, AVX-512, AMX) and the fp32 GEMM rate
that oneDNN and ``torch.mm`` reach on it, since the GEMMs decide the masked-CE timings.

Results go to ``benchmarks/results/kernels_<op>.{csv,md,png}`` (``--out`` to change the folder).

Ops are one function each (``bench_<op>``) registered in ``OPS``; they share the harness below.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    cpu_peak_memory_available,
    machine,
    median_p20_p80,
    memory_probe_env,
    output_dir,
    peak_extra_bytes,
)

# --------------------------------------------------------------------------------------------------
# Shared harness
# --------------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation of an op: ``setup(inputs)`` returns a callable running it once (forward and
    backward), whose result ``(output, grads...)`` is compared with the reference."""

    name: str
    setup: Callable
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot run here


@dataclass
class Row:
    op: str
    impl: str
    shape: str
    device: str
    median_s: float
    p20_s: float
    p80_s: float
    first_call_s: float
    peak_extra_mb: float | None
    max_err_out: float
    max_err_grad: float
    repeats: int
    note: str = ""


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(runners: dict[str, Callable], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call for each runner, one call of each per round, rotating the order each round."""
    names = list(runners)
    times = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name not in times:
                continue
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            try:
                result = runners[name]()
            except Exception as exc:  # one implementation failing must not end the run
                _report_failure(name, "timing", exc)
                del times[name]
                continue
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            del result
    return times


def _report_failure(impl: str, stage: str, exc: BaseException):
    """Log an implementation's failure (the run goes on without it)."""
    last = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
    print(f"[{impl}] failed during {stage}: {type(exc).__name__}: {exc}\n{''.join(last)}", file=sys.stderr)


def max_abs_err(got, ref) -> float:
    return float((got.detach().double() - ref.double()).abs().max()) if got.numel() else 0.0


def probe_memory(op: str, impl: str, shape: dict, dtype: str) -> float | None:
    """Peak extra RSS (MB) of one call of ``impl`` in a fresh process (see the module docstring)."""
    if not cpu_peak_memory_available():
        return None
    env = memory_probe_env()
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.kernels",
        "--probe",
        json.dumps(dict(op=op, impl=impl, shape=shape, dtype=dtype)),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"memory probe of {op}/{impl} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def _probe_main(spec: dict):
    bench = OPS[spec["op"]]
    inputs = bench.make_inputs(spec["shape"], getattr(torch, spec["dtype"]), "cpu")
    impl = {i.name: i for i in bench.impls("cpu")}[spec["impl"]]
    fn = impl.setup(inputs)
    fn()  # warm-up: compiles, fills caches
    print(json.dumps(dict(peak_extra_mb=peak_extra_bytes(fn) / 2**20)))


def cuda_peak_memory(impl: Impl, x: dict) -> float:
    """MB allocated on the GPU by one call of ``impl`` on top of its inputs."""
    return peak_extra_bytes(impl.setup(x), "cuda") / 2**20


def write_results(rows: list[Row], op: str, out_dir: Path, title: str):
    """CSV + Markdown table + PNG plot (median with p20-p80 bars, and peak memory)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"kernels_{op}"
    keys = list(asdict(rows[0]))
    with open(f"{base}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([getattr(r, k) for k in keys])
    lines = [f"# {title}", "", machine_line(rows[0].device), ""]
    for shape in dict.fromkeys(r.shape for r in rows):
        group = [r for r in rows if r.shape == shape]
        baseline = getattr(OPS[op], "baseline", "eager")  # the row the speed-ups are relative to
        ref = next((r for r in group if r.impl == baseline), None)
        lines += [f"**{shape}** ({group[0].device}, {group[0].repeats} interleaved repeats)", ""]
        lines.append(
            f"| implementation | median s | p20 s | p80 s | vs {baseline} | first call s | peak extra MB | "
            "max err out | max err grad |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in group:
            speed = f"{ref.median_s / r.median_s:.1f}x" if ref else ""
            mem = f"{r.peak_extra_mb:,.0f}" if r.peak_extra_mb is not None else "n/a"
            lines.append(
                f"| {r.impl} | {r.median_s:.3f} | {r.p20_s:.3f} | {r.p80_s:.3f} | {speed} | {r.first_call_s:.2f} | "
                f"{mem} | {r.max_err_out:.1e} | {r.max_err_grad:.1e} |"
            )
        notes = [f"- {r.impl}: {r.note}" for r in group if r.note]
        lines += [""] + notes + ([""] if notes else [])
    (base.with_suffix(".md")).write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.2 * len(shapes)), squeeze=False)
    for ax_t, ax_m, shape in zip(axes[:, 0], axes[:, 1], shapes):
        group = [r for r in rows if r.shape == shape]
        names = [r.impl for r in group]
        med = [r.median_s for r in group]
        err = [[r.median_s - r.p20_s for r in group], [r.p80_s - r.median_s for r in group]]
        ax_t.barh(names, med, xerr=err, color="tab:blue")
        ax_t.set_xlabel("seconds per call (median, p20-p80)")
        ax_t.set_title(shape, fontsize=9)
        ax_m.barh(names, [r.peak_extra_mb or 0 for r in group], color="tab:orange")
        ax_m.set_xlabel("peak extra memory (MB)")
        for ax in (ax_t, ax_m):
            ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{base}.png", dpi=110)
    plt.close(fig)


def machine_line(device: str = "cpu") -> str:
    line = f"Measured {datetime.date.today().isoformat()} on {machine()}."
    return line + (f" {cpu_description()}." if device == "cpu" else "")


def cpu_isa() -> tuple[str, str]:
    """(CPU model name, its widest vector ISA: "AMX", "AVX-512", "AVX2" or "pre-AVX2") from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        return model, "unknown ISA"
    if "amx_tile" in flags:
        isa = "AMX" + (" (bf16)" if "amx_bf16" in flags else "") + " + AVX-512"
    elif "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = "pre-AVX2"
    return model, isa


def gemm_gflops(rows: int = 1024, hidden: int = 256, vocab: int = 16384, repeats: int = 3) -> dict[str, float]:
    """fp32 GFLOP/s of oneDNN's GEMM and torch.mm at a masked-CE chunk's shape ([rows, hidden] x
    [hidden, vocab]), best of ``repeats`` interleaved; oneDNN is absent where this torch has none."""
    mlce = importlib.import_module("vrpo_kernels.masked_linear_ce.torch_path")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(vocab, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    runs = {"torch.mm": lambda: w @ x.T}
    try:
        mlce._onednn_linear(w, x, None)
        runs["oneDNN"] = lambda: mlce._onednn_linear(w, x, None)
    except Exception as exc:
        print(f"oneDNN GEMM unavailable here: {type(exc).__name__}: {exc}", file=sys.stderr)
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: 2 * rows * hidden * vocab / t / 1e9 for k, t in best.items()}


# Environment variables that cap the ISA the libraries use (ATen and Inductor, oneDNN, MKL): with them
# an AVX-512 CPU runs the code paths of an AVX2 one, so both can be measured on one machine.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_description() -> str:
    """CPU model, ISA (and any ISA cap set in the environment), fp32 GEMM GFLOP/s of both GEMMs and the
    one masked_linear_ce's probe chose."""
    mlce = importlib.import_module("vrpo_kernels.masked_linear_ce.torch_path")
    model, isa = cpu_isa()
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    if caps:
        isa += f" (capped: {', '.join(caps)})"
    rates = ", ".join(f"{k} {v:.0f}" for k, v in gemm_gflops().items())
    return f"CPU: {model}, {isa}; fp32 GEMM GFLOP/s (best of 3, 1024x256x16384): {rates}; masked_linear_ce uses {mlce._cpu_gemm()}"  # noqa: E501


def run_op(op: str, args) -> list[Row]:
    """Time, probe memory and check errors for every implementation of ``op`` at each of its shapes."""
    bench = OPS[op]
    rows = []
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.quick else [])
    else:
        devices = [args.device]
    for device in devices:
        for shape in bench.shapes(device, args.quick):
            dtype = bench.dtype(device)
            inputs = bench.make_inputs(shape, dtype, device)
            reference = bench.reference(inputs)
            impls = [i for i in bench.impls(device) if not args.impls or i.name in args.impls]
            runners, first, errors, notes = {}, {}, {}, {}
            for impl in impls:
                why = impl.available()
                if why:
                    print(f"[{op}] skipping {impl.name}: {why}", file=sys.stderr)
                    continue
                try:
                    fn = impl.setup(inputs)
                    _sync(device)
                    t0 = time.perf_counter()
                    result = fn()
                    _sync(device)
                    first[impl.name] = time.perf_counter() - t0
                    errors[impl.name] = bench.errors(result, reference)
                except Exception as exc:  # one implementation failing must not end the run
                    _report_failure(impl.name, "its first call", exc)
                    continue
                runners[impl.name] = fn
                del result
                print(f"[{op}] {impl.name}: first call {first[impl.name]:.2f} s", file=sys.stderr)
            if device == "cuda":
                import triton.testing

                times = {
                    k: [t / 1e3 for t in triton.testing.do_bench(f, return_mode="all")] for k, f in runners.items()
                }
            else:
                times = interleaved_times(runners, args.repeats, device)
            del runners
            gc.collect()
            for name, ts in times.items():
                try:
                    if device == "cuda":
                        mem = cuda_peak_memory({i.name: i for i in impls}[name], inputs)
                    else:
                        mem = None if args.no_memory else probe_memory(op, name, shape, str(dtype).split(".")[-1])
                except Exception as exc:
                    _report_failure(name, "the memory probe", exc)
                    mem = None
                rows.append(
                    Row(
                        op=op,
                        impl=name,
                        shape=bench.describe(shape, dtype),
                        device=device,
                        median_s=median_p20_p80(ts)[0],
                        p20_s=median_p20_p80(ts)[1],
                        p80_s=median_p20_p80(ts)[2],
                        first_call_s=first[name],
                        peak_extra_mb=mem,
                        max_err_out=errors[name][0],
                        max_err_grad=errors[name][1],
                        repeats=len(ts),
                        note=notes.get(name, bench.notes.get(name, "")),
                    )
                )
                annotate = getattr(bench, "annotate", None)
                if annotate is not None:
                    rows[-1].note = "; ".join(
                        filter(None, [rows[-1].note, annotate(inputs, rows[-1].median_s, device)])
                    )
                print(f"[{op}] {rows[-1]}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------------
# masked_ce: vrpo_kernels.masked_linear_ce, forward + backward
# --------------------------------------------------------------------------------------------------


class MaskedCE:
    """``sum_i cot_i * w_i * log_softmax(h_i W^T)[y_i]`` over the selected rows, then d/d(h, W)."""

    title = "masked linear cross-entropy (forward + backward)"
    notes = {
        "eager": "full logits [N, V] on all rows, log_softmax, gather",
        "eager_gathered": "the same on the selected rows only",
        "compiled_gathered": "torch.compile of eager_gathered",
        "vrpo_torch": "vrpo_kernels.masked_linear_ce(impl='torch'), default max_buffer_bytes (1 GiB): "
        "keeps the selected rows' softmax numerators when they fit",
        "vrpo_torch_256mb": "vrpo_kernels.masked_linear_ce(impl='torch', max_buffer_bytes=256 << 20): "
        "streamed, recomputed when the logits exceed 256 MB",
        "cce_torch_compile": "cut_cross_entropy.linear_cross_entropy(impl='torch_compile') on the selected rows",
        "vrpo_triton": "vrpo_kernels.masked_linear_ce(impl='triton')",
        "cce_triton": "cut_cross_entropy.linear_cross_entropy(impl='cce') on the selected rows",
        "liger": "liger_kernel LigerFusedLinearCrossEntropyLoss(reduction='none') on the selected rows",
    }

    @staticmethod
    def shapes(device: str, quick: bool) -> list[dict]:
        if quick:
            return [dict(N=64, H=32, V=1000, frac=0.5)]
        if device == "cuda":
            return [dict(N=8192, H=4096, V=126464, frac=0.5)]
        return [dict(N=2048, H=256, V=126464, frac=0.5)]

    @staticmethod
    def dtype(device: str):
        return torch.bfloat16 if device == "cuda" else torch.float32

    @staticmethod
    def describe(shape: dict, dtype) -> str:
        sel = int(shape["N"] * shape["frac"])
        return f"N={shape['N']} (~{sel} selected), H={shape['H']}, V={shape['V']}, {str(dtype).split('.')[-1]}"

    @staticmethod
    def make_inputs(shape: dict, dtype, device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        N, H, V = shape["N"], shape["H"], shape["V"]
        hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
        weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype)
        targets = torch.randint(0, V, (N,), generator=g).to(device)
        row_weight = (torch.rand(N, generator=g) * 4).to(device)
        mask = (torch.rand(N, generator=g) < shape["frac"]).to(device)
        cot = torch.randn(N, generator=g).to(device)
        return dict(hidden=hidden, weight=weight, targets=targets, row_weight=row_weight, mask=mask, cot=cot)

    @staticmethod
    def reference(x: dict, rows_per_chunk: int = 128) -> tuple:
        """float64 output [N] and gradients (hidden, weight), row chunk by row chunk (never [N, V])."""
        h, W = x["hidden"].double(), x["weight"].double()
        out = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
        dh, dW = torch.zeros_like(h), torch.zeros_like(W)
        rows = x["mask"].nonzero()[:, 0]
        for i in range(0, rows.numel(), rows_per_chunk):
            r = rows[i : i + rows_per_chunk]
            logp = torch.log_softmax(h[r] @ W.T, dim=-1)
            wr = x["row_weight"][r].double()
            out[r] = wr * logp.gather(-1, x["targets"][r, None])[:, 0]
            dz = logp.exp_().mul_(-(wr * x["cot"][r].double())[:, None])
            dz[torch.arange(r.numel()), x["targets"][r]] += wr * x["cot"][r].double()
            dh[r] = dz @ W
            dW += dz.T @ h[r]
            del logp, dz
        return out, dh, dW

    @staticmethod
    def errors(result, ref) -> tuple[float, float]:
        out, dh, dW = result
        return max_abs_err(out, ref[0]), max(max_abs_err(dh, ref[1]), max_abs_err(dW, ref[2]))

    @staticmethod
    def _runner(x: dict, forward: Callable) -> Callable:
        """fwd + bwd of ``forward(hidden, weight) -> float32 [N]`` weighted by the cotangent."""

        def run():
            h = x["hidden"].detach().requires_grad_()
            W = x["weight"].detach().requires_grad_()
            out = forward(h, W)
            dh, dW = torch.autograd.grad((out * x["cot"]).sum(), [h, W])
            return out.detach(), dh, dW

        return run

    @classmethod
    def impls(cls, device: str) -> list[Impl]:
        from vrpo_kernels import masked_linear_ce
        from vrpo_kernels.masked_linear_ce import masked_linear_ce_eager

        def eager(x):
            return cls._runner(x, lambda h, W: masked_linear_ce_eager(h, W, x["targets"], x["row_weight"], x["mask"]))

        def gathered_fn(h_sel, W, tgt, w_sel):
            logp = torch.log_softmax((h_sel @ W.T).float(), dim=-1).gather(-1, tgt[:, None])[:, 0]
            return logp * w_sel

        def gathered(fn):
            def setup(x):
                rows = x["mask"].nonzero()[:, 0]
                tgt, w_sel = x["targets"][rows], x["row_weight"][rows]

                def forward(h, W):
                    out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
                    return out.index_put((rows,), fn(h[rows], W, tgt, w_sel))

                return cls._runner(x, forward)

            return setup

        def compiled(x):
            return gathered(torch.compile(gathered_fn, dynamic=False))(x)

        def ours(impl, max_buffer_bytes=None):
            def setup(x):
                return cls._runner(
                    x,
                    lambda h, W: masked_linear_ce(
                        h, W, x["targets"], x["row_weight"], x["mask"], impl=impl, max_buffer_bytes=max_buffer_bytes
                    ),
                )

            return setup

        def cce(impl):
            def fn(h_sel, W, tgt, w_sel):
                from cut_cross_entropy import linear_cross_entropy

                return -linear_cross_entropy(h_sel, W, tgt, reduction="none", impl=impl).float() * w_sel

            return gathered(fn)

        def liger(x):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
            return gathered(lambda h_sel, W, tgt, w_sel: -loss(W, h_sel, tgt).float() * w_sel)(x)

        def installed(module: str, extra: str = "bench") -> Callable[[], str | None]:
            def check():
                try:
                    importlib.import_module(module)
                except Exception as exc:
                    return f"{module} is not importable ({type(exc).__name__}); pip install '.[{extra}]'"
                return None

            return check

        impls = [
            Impl("eager", eager),
            Impl("eager_gathered", gathered(gathered_fn)),
            Impl("compiled_gathered", compiled),
        ]
        if device == "cpu":
            impls += [
                Impl("vrpo_torch", ours("torch")),
                Impl("vrpo_torch_256mb", ours("torch", 256 << 20)),
                Impl("cce_torch_compile", cce("torch_compile"), installed("cut_cross_entropy")),
            ]
        else:
            impls += [
                Impl("vrpo_triton", ours("triton")),
                Impl("cce_triton", cce("cce"), installed("cut_cross_entropy")),
                Impl("liger", liger, installed("liger_kernel")),
            ]
        return impls


# --------------------------------------------------------------------------------------------------
# attention: vrpo_kernels.bidirectional_attention over packed rows, forward + backward
# --------------------------------------------------------------------------------------------------


def packed_segments(batch: int, seq_len: int, min_len: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """int64 [batch, seq_len]: samples of random length in [min_len, max_len] packed side by side into
    each row; the tail that no further sample fits into is padding (-1), as when packing a dataset."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, sid = [], 0
        while True:
            n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            if len(ids) + n > seq_len:
                break
            ids += [sid] * n
            sid += 1
        rows.append(ids + [-1] * (seq_len - len(ids)))
    return torch.tensor(rows)


def segment_runs(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, length) of each contiguous run of one non-negative id."""
    runs = []
    for row in segment_ids.tolist():
        row_runs, start = [], 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                if row[start] >= 0:
                    row_runs.append((start, i - start))
                start = i
        runs.append(row_runs)
    return runs


def useful_flops(segment_ids: torch.Tensor, n_heads: int, head_dim: int) -> int:
    """Forward + backward FLOPs over the attended (query, key) pairs only: the forward's two matmuls
    (4 D per pair) plus the backward's five (10 D per pair)."""
    pairs = sum(n * n for row in segment_runs(segment_ids) for _, n in row)
    return 14 * head_dim * n_heads * pairs


def matmul_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    """The card's measured dense matmul rate (TFLOP/s) at n x n x n, the yardstick for attention."""
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def flash_attn_forward(q, k, v, segment_ids):
    """flash-attn 2's ``flash_attn_varlen_func`` on packed rows: ``(pack, forward, unpack)``.

    ``pack(t)`` turns a [B, H, S, D] tensor into the [total, H, D] token layout (padding dropped),
    ``forward(pq, pk, pv)`` runs the kernel with cu_seqlens, ``unpack(x)`` maps back (zeros at padding).
    """
    from flash_attn import flash_attn_varlen_func

    B, H, S, D = q.shape
    valid = (segment_ids >= 0).flatten().nonzero()[:, 0]
    lengths = [n for row in segment_runs(segment_ids.cpu()) for _, n in row]
    cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)

    def pack(t):
        return t.transpose(1, 2).reshape(B * S, t.shape[1], D)[valid]

    def unpack(x):
        full = x.new_zeros(B * S, x.shape[1], D)
        full[valid] = x
        return full.view(B, S, x.shape[1], D).transpose(1, 2)

    def forward(pq, pk, pv):
        return flash_attn_varlen_func(pq, pk, pv, cu, cu, max(lengths), max(lengths), causal=False)

    return pack, forward, unpack


class Attention:
    """Non-causal attention over rows packed with samples of random lengths (blocked across samples)."""

    title = "bidirectional varlen attention (forward + backward)"
    notes = {
        "eager": "matmul + masked softmax, materialises [B, H, S, S] scores",
        "vrpo_torch": "bidirectional_attention(impl='torch'): SDPA with a block-diagonal mask",
        "vrpo_triton": "bidirectional_attention(impl='triton'): flash-style, skips cross-sample blocks",
        "sdpa_block_mask": "F.scaled_dot_product_attention with a block-diagonal mask",
        "flash_attn_varlen": "flash_attn_varlen_func on the unpadded tokens",
    }

    @staticmethod
    def shapes(device: str, quick: bool) -> list[dict]:
        if quick:
            return [dict(batch=2, seq_len=40, n_heads=2, head_dim=16, min_len=1, max_len=17)]
        if device == "cuda":
            return [dict(batch=8, seq_len=4096, n_heads=32, head_dim=128, min_len=128, max_len=1536)]
        return [dict(batch=2, seq_len=512, n_heads=8, head_dim=64, min_len=16, max_len=192)]

    @staticmethod
    def dtype(device: str):
        return torch.bfloat16 if device == "cuda" else torch.float32

    @staticmethod
    def describe(shape: dict, dtype) -> str:
        return (
            f"B={shape['batch']}, S={shape['seq_len']}, H={shape['n_heads']}, D={shape['head_dim']}, "
            f"samples {shape['min_len']}-{shape['max_len']} tokens, {str(dtype).split('.')[-1]}"
        )

    @staticmethod
    def make_inputs(shape: dict, dtype, device: str) -> dict:
        B, S, H, D = shape["batch"], shape["seq_len"], shape["n_heads"], shape["head_dim"]
        g = torch.Generator().manual_seed(0)
        q, k, v, grad = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(4))
        seg = packed_segments(B, S, shape["min_len"], shape["max_len"]).to(device)
        return dict(q=q, k=k, v=v, grad=grad, segment_ids=seg, scale=D**-0.5, flops=useful_flops(seg.cpu(), H, D))

    @staticmethod
    def reference(x: dict) -> tuple:
        """float64 output and (dq, dk, dv), one sample at a time (row 0 only on the GPU: a full float64
        reference of the GPU shape would not fit). Rows not computed stay NaN and are not compared."""
        from vrpo_kernels.attention import attention_reference

        q = x["q"]
        rows = [0] if q.is_cuda else range(q.shape[0])
        out = torch.full(q.shape, float("nan"), dtype=torch.float64, device=q.device)
        grads = [torch.full(q.shape, float("nan"), dtype=torch.float64, device=q.device) for _ in range(3)]
        for b in rows:
            for start, n in segment_runs(x["segment_ids"][b : b + 1].cpu())[0]:
                s = slice(start, start + n)
                leaves = [t[b : b + 1, :, s].double().requires_grad_() for t in (x["q"], x["k"], x["v"])]
                ref = attention_reference(*leaves, scale=x["scale"])
                ref.backward(x["grad"][b : b + 1, :, s].double())
                out[b, :, s] = ref[0].detach()
                for acc, leaf in zip(grads, leaves):
                    acc[b, :, s] = leaf.grad[0]
            pad = x["segment_ids"][b] < 0  # padding queries: output and gradients are exactly 0
            for t in (out, *grads):
                t[b, :, pad] = 0.0
        return out, grads

    @staticmethod
    def errors(result, ref) -> tuple[float, float]:
        out, grads = result
        known = ~torch.isnan(ref[0])
        err = lambda got, want: float((got.double() - want)[known].abs().max())  # noqa: E731
        return err(out, ref[0]), max(err(g, r) for g, r in zip(grads, ref[1]))

    @staticmethod
    def annotate(x: dict, median_s: float, device: str) -> str:
        tflops = x["flops"] / median_s / 1e12
        if device != "cuda":
            return f"{tflops * 1e3:.1f} GFLOP/s useful"
        rate = Attention._matmul_rate = getattr(Attention, "_matmul_rate", None) or matmul_tflops()
        return f"{tflops:.0f} TFLOP/s useful ({tflops / rate:.0%} of the measured {rate:.0f} TFLOP/s bf16 matmul)"

    @staticmethod
    def _runner(x: dict, forward: Callable, pack=None, unpack=None) -> Callable:
        pack = pack or (lambda t: t)
        unpack = unpack or (lambda t: t)

        def run():
            leaves = [pack(t).detach().requires_grad_() for t in (x["q"], x["k"], x["v"])]
            out = forward(*leaves)
            grads = torch.autograd.grad(out, leaves, pack(x["grad"]).to(out.dtype))
            return unpack(out.detach()), [unpack(g) for g in grads]

        return run

    @classmethod
    def impls(cls, device: str) -> list[Impl]:
        from vrpo_kernels import bidirectional_attention

        def ours(impl):
            def setup(x):
                return cls._runner(
                    x, lambda q, k, v: bidirectional_attention(q, k, v, x["segment_ids"], scale=x["scale"], impl=impl)
                )

            return setup

        def flash(x):
            pack, forward, unpack = flash_attn_forward(x["q"], x["k"], x["v"], x["segment_ids"])
            return cls._runner(x, forward, pack, unpack)

        def installed(module):
            def check():
                return (
                    None if importlib.util.find_spec(module) else f"{module} is not installed; pip install '.[flash]'"
                )

            return check

        if device == "cpu":
            return [Impl("eager", ours("eager")), Impl("vrpo_torch", ours("torch"))]
        return [
            Impl("vrpo_triton", ours("triton")),
            Impl("sdpa_block_mask", ours("torch")),
            Impl("flash_attn_varlen", flash, installed("flash_attn")),
        ]


# --------------------------------------------------------------------------------------------------
# mask_sampling: vrpo_kernels.sample_masks (l-uniform: exactly l of the response positions)
# --------------------------------------------------------------------------------------------------


class MaskSampling:
    """Masks for ``n`` samples per row, each hiding exactly ``count`` response positions, uniformly.

    No gradients and no float64 reference: a mask is right when its count is exact and it stays inside
    the response. ``max_err_out`` counts the (sample) masks that break either rule, so it must be 0;
    ``max_err_grad`` is always 0. Uniformity is checked statistically in tests/kernels/test_mask_sampling.py.
    """

    title = "mask sampling (l-uniform, exact counts)"
    notes = {
        "eager": "rank uniform keys with two argsorts over the whole row",
        "vrpo_torch": "sample_masks(impl='torch')",
        "vrpo_triton": "sample_masks(impl='triton'): Philox keys and a bisection select in one kernel",
    }

    @staticmethod
    def shapes(device: str, quick: bool) -> list[dict]:
        if quick:
            return [dict(B=4, n=4, L=64)]
        if device == "cuda":
            return [dict(B=64, n=8, L=4096)]
        return [dict(B=32, n=8, L=1024)]

    @staticmethod
    def dtype(device: str):
        return torch.bool

    @staticmethod
    def describe(shape: dict, dtype) -> str:
        return f"B={shape['B']} rows x n={shape['n']} samples, L={shape['L']}"

    @staticmethod
    def make_inputs(shape: dict, dtype, device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        B, n, L = shape["B"], shape["n"], shape["L"]
        start = torch.randint(0, L // 4, (B, 1), generator=g)  # a prompt, then the response,
        end = L - torch.randint(0, L // 4, (B, 1), generator=g)  # then padding
        pos = torch.arange(L)[None]
        resp = (pos >= start) & (pos < end)
        lengths = resp.sum(-1, keepdim=True)
        counts = (torch.rand(B, n, generator=g) * lengths).floor().long() + 1
        return dict(response_mask=resp.to(device), counts=counts.to(device))

    @staticmethod
    def reference(x: dict):
        return x

    @staticmethod
    def errors(result, ref) -> tuple[float, float]:
        masked = result
        outside = (masked & ~ref["response_mask"][:, None, :]).any(-1)
        wrong_count = masked.sum(-1) != ref["counts"]
        return float((outside | wrong_count).sum()), 0.0

    @classmethod
    def impls(cls, device: str) -> list[Impl]:
        from vrpo_kernels import sample_masks

        def eager(x):
            def run():
                B, L = x["response_mask"].shape
                keys = torch.rand(B, x["counts"].shape[1], L, device=x["counts"].device, dtype=torch.float64)
                keys = keys.masked_fill(~x["response_mask"][:, None, :], 2.0)
                return keys.argsort(-1).argsort(-1) < x["counts"][..., None]

            return run

        def ours(impl):
            def setup(x):
                g = torch.Generator(device=x["counts"].device).manual_seed(0)
                return lambda: sample_masks(x["response_mask"], counts=x["counts"], generator=g, impl=impl)

            return setup

        if device == "cpu":
            return [Impl("eager", eager), Impl("vrpo_torch", ours("torch"))]
        return [Impl("eager", eager), Impl("vrpo_torch", ours("torch")), Impl("vrpo_triton", ours("triton"))]


# --------------------------------------------------------------------------------------------------
# masks: the noisy inputs of a training step, keyed per sequence (vrpo.estimator.noise.noisy_draw)
# --------------------------------------------------------------------------------------------------


def per_row_noisy_inputs(input_ids, response_mask, keys: list[int], plan, mask_token_id: int):
    """The former keyed path, kept here only to compare with: the former ``vrpo.sampling.draw_masks_keyed``'s loop
    (a ``torch.Generator`` per row on the CPU, ``draw_masks`` over the row's response positions, placed
    into the padded row, shipped to the device), then the mask token written there as the ELBO did
    (``noisy_inputs``). Returns (noisy ids, masked, weight)."""
    from vrpo.estimator.sampling import draw_masks, response_lengths

    lengths = response_lengths(response_mask).tolist()
    resp_cpu = response_mask.cpu()
    B, L = resp_cpu.shape
    masked = torch.zeros(B, plan.n, L, dtype=torch.bool)
    weight = torch.empty(B, plan.n)
    levels = torch.empty(B, plan.n_t)
    for b, (key, Lb) in enumerate(zip(keys, lengths)):
        g = torch.Generator().manual_seed(key)
        row = draw_masks(torch.ones(1, Lb, dtype=torch.bool), plan, generator=g)
        masked[b][:, resp_cpu[b]] = row.masked[0]
        weight[b], levels[b] = row.weight[0], row.levels[0]
    device = response_mask.device
    masked, weight = masked.to(device), weight.to(device)
    noisy = torch.where(masked, torch.as_tensor(mask_token_id, device=device), input_ids[:, None, :])
    return noisy, masked, weight


class Masks:
    """The noisy inputs of one training step: ``B`` sequences (16 pairs x 2 sides), ``n = n_t`` l-uniform
    samples each, keyed per sequence by ``draw_key(seed, stream, epoch, pair, side)``.

    No gradients and no float64 reference: a draw is right when every sample masks exactly its level's
    count of response positions, nothing outside the response, and the noisy ids carry the mask token
    exactly there. ``max_err_out`` counts the samples that break a rule, so it must be 0; the torch and
    Triton paths' bit equality is tested in tests/estimator/test_noise.py.
    """

    title = "keyed noisy inputs (l-uniform, n_t samples per sequence)"
    baseline = "per_row"
    notes = {
        "per_row": "the former draw_masks_keyed: a torch.Generator per row in a Python loop on the CPU, "
        "masks shipped to the device, mask token written there",
        "vrpo_torch": "noisy_draw(impl='torch'): Philox4x32-10 in int64 arithmetic, vectorised over rows and samples",
        "vrpo_triton": "noisy_draw(impl='triton'): one launch writes ids, masks, weights and levels",
    }
    MASK_TOKEN = 126336

    @staticmethod
    def shapes(device: str, quick: bool) -> list[dict]:
        if quick:
            return [dict(B=4, n=2, L=64)]
        return [dict(B=32, n=8, L=1024), dict(B=32, n=8, L=4096)]

    @staticmethod
    def dtype(device: str):
        return torch.int64

    @staticmethod
    def describe(shape: dict, dtype) -> str:
        return f"B={shape['B']} rows x n={shape['n']} samples, L={shape['L']}, responses 3/4 of L"

    @staticmethod
    def make_inputs(shape: dict, dtype, device: str) -> dict:
        from vrpo.estimator.sampling import draw_key

        g = torch.Generator().manual_seed(0)
        B, L = shape["B"], shape["L"]
        Lr = 3 * L // 4
        start = torch.randint(0, L - Lr + 1, (B, 1), generator=g)  # a prompt, the response, padding
        pos = torch.arange(L)[None]
        resp = (pos >= start) & (pos < start + Lr)
        ids = torch.randint(0, 126000, (B, L), generator=g)
        keys = [draw_key(0, "train", 0, i // 2, i % 2) for i in range(B)]
        return dict(
            input_ids=ids.to(device),
            response_mask=resp.to(device),
            keys=keys,
            key_tensor=torch.tensor(keys, device=device),
            n=shape["n"],
        )

    @staticmethod
    def reference(x: dict):
        return x

    @classmethod
    def errors(cls, result, ref) -> tuple[float, float]:
        noisy, masked, weight = result
        resp = ref["response_mask"][:, None, :]
        counts = masked.sum(-1)
        lengths = resp.sum(-1)
        # The weight L_b / l within two float32 roundings (the per-row path multiplies by a reciprocal).
        exact = lengths.double() / counts.double()
        wrong = (masked & ~resp).any(-1) | (counts < 1) | ((weight.double() - exact).abs() > 2 * 2.0**-24 * exact)
        wrong |= (noisy != torch.where(masked, cls.MASK_TOKEN, ref["input_ids"][:, None, :])).any(-1)
        return float(wrong.sum()), 0.0

    @classmethod
    def impls(cls, device: str) -> list[Impl]:
        from vrpo.estimator.noise import noisy_draw
        from vrpo.estimator.sampling import SamplingPlan

        def per_row(x):
            plan = SamplingPlan(n_t=x["n"])
            return lambda: per_row_noisy_inputs(x["input_ids"], x["response_mask"], x["keys"], plan, cls.MASK_TOKEN)

        def ours(impl):
            def setup(x):
                plan = SamplingPlan(n_t=x["n"])

                def run():
                    d = noisy_draw(x["input_ids"], x["response_mask"], plan, x["key_tensor"], cls.MASK_TOKEN, impl=impl)
                    return d.input_ids, d.masked, d.weight

                return run

            return setup

        impls = [Impl("per_row", per_row), Impl("vrpo_torch", ours("torch"))]
        return impls + ([Impl("vrpo_triton", ours("triton"))] if device == "cuda" else [])


OPS = {"masked_ce": MaskedCE, "attention": Attention, "mask_sampling": MaskSampling, "masks": Masks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {list(OPS)}")
    parser.add_argument("--impls", default="", help="comma-separated implementation names (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds on CPU")
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 repeats: a smoke run in seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU rows, then the GPU rows when CUDA is there; cpu or cuda: only those",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the memory subprocess
    args = parser.parse_args(argv)
    if args.probe:
        _probe_main(json.loads(args.probe))
        return 0
    args.impls = [s for s in args.impls.split(",") if s]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    args.out = output_dir(args.out, args.quick)
    for op in [s for s in args.ops.split(",") if s]:
        if op not in OPS:
            parser.error(f"--ops: unknown op {op!r}; choose from {list(OPS)}")
        rows = run_op(op, args)
        if not rows:
            print(f"[{op}] no implementation ran", file=sys.stderr)
            return 1
        write_results(rows, op, args.out, OPS[op].title)
        print((args.out / f"kernels_{op}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
