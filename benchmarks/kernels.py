"""Kernel benchmark: each op's implementations side by side, time, peak extra memory and error.

    python -m benchmarks.kernels                 # every op at its CPU shape (and GPU shape on CUDA)
    python -m benchmarks.kernels --quick         # toy sizes, seconds (what the smoke test runs)
    python -m benchmarks.kernels --ops masked_ce --repeats 5 --impls eager,vrpo_torch

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

Results go to ``benchmarks/results/kernels_<op>.{csv,md,png}`` (``--out`` to change the folder).

Ops are one function each (``bench_<op>``) registered in ``OPS``; they share the harness below.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(runners: dict[str, Callable], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call for each runner, one call of each per round, rotating the order each round."""
    names = list(runners)
    times = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            result = runners[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            del result
    return times


def max_abs_err(got, ref) -> float:
    return float((got.detach().double() - ref.double()).abs().max()) if got.numel() else 0.0


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, from /proc."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def probe_memory(op: str, impl: str, shape: dict, dtype: str) -> float | None:
    """Peak extra RSS (MB) of one call of ``impl`` in a fresh process (see the module docstring)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--probe", json.dumps(dict(op=op, impl=impl, shape=shape, dtype=dtype))]
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
    gc.collect()
    _reset_peak_rss()
    rest, _ = _rss_bytes()
    result = fn()
    _, peak = _rss_bytes()
    del result
    print(json.dumps(dict(peak_extra_mb=(peak - rest) / 2**20)))


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
    lines = [f"# {title}", "", machine_line(), ""]
    for shape in dict.fromkeys(r.shape for r in rows):
        group = [r for r in rows if r.shape == shape]
        ref = next((r for r in group if r.impl == "eager"), None)
        lines += [f"**{shape}** ({group[0].device}, {group[0].repeats} interleaved repeats)", ""]
        lines.append("| implementation | median s | p20 s | p80 s | vs eager | first call s | peak extra MB | "
                     "max err out | max err grad |")
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


def machine_line() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor() or platform.machine()}"
    return (f"Measured {datetime.date.today().isoformat()} on {dev}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.")


def run_op(op: str, args) -> list[Row]:
    """Time, probe memory and check errors for every implementation of ``op`` at each of its shapes."""
    bench = OPS[op]
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.quick else [])
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
                fn = impl.setup(inputs)
                _sync(device)
                t0 = time.perf_counter()
                result = fn()
                _sync(device)
                first[impl.name] = time.perf_counter() - t0
                errors[impl.name] = bench.errors(result, reference)
                runners[impl.name] = fn
                del result
                print(f"[{op}] {impl.name}: first call {first[impl.name]:.2f} s", file=sys.stderr)
            if device == "cuda":
                import triton.testing

                times = {k: [t / 1e3 for t in triton.testing.do_bench(f, return_mode="all")] for k, f in runners.items()}
            else:
                times = interleaved_times(runners, args.repeats, device)
            del runners
            gc.collect()
            for name, ts in times.items():
                if device == "cuda":
                    mem = bench.cuda_memory({i.name: i for i in impls}[name], inputs)
                else:
                    mem = None if args.no_memory else probe_memory(op, name, shape, str(dtype).split(".")[-1])
                rows.append(Row(
                    op=op, impl=name, shape=bench.describe(shape, dtype), device=device,
                    median_s=statistics.median(ts), p20_s=quantile(ts, 0.2), p80_s=quantile(ts, 0.8),
                    first_call_s=first[name], peak_extra_mb=mem, max_err_out=errors[name][0],
                    max_err_grad=errors[name][1], repeats=len(ts), note=notes.get(name, bench.notes.get(name, "")),
                ))
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
        "vrpo_torch": "vrpo_kernels.masked_linear_ce(impl='torch'): streamed, chunked",
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

        def ours(impl):
            def setup(x):
                return cls._runner(
                    x, lambda h, W: masked_linear_ce(h, W, x["targets"], x["row_weight"], x["mask"], impl=impl)
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
                Impl("cce_torch_compile", cce("torch_compile"), installed("cut_cross_entropy")),
            ]
        else:
            impls += [
                Impl("vrpo_triton", ours("triton")),
                Impl("cce_triton", cce("cce"), installed("cut_cross_entropy")),
                Impl("liger", liger, installed("liger_kernel")),
            ]
        return impls

    @classmethod
    def cuda_memory(cls, impl: Impl, x: dict) -> float:
        fn = impl.setup(x)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del result
        return (peak - base) / 2**20


OPS = {"masked_ce": MaskedCE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {list(OPS)}")
    parser.add_argument("--impls", default="", help="comma-separated implementation names (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds on CPU")
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 repeats: a smoke run in seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the memory subprocess
    args = parser.parse_args(argv)
    if args.probe:
        _probe_main(json.loads(args.probe))
        return 0
    args.impls = [s for s in args.impls.split(",") if s]
    if args.quick:
        args.repeats = min(args.repeats, 2)
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
