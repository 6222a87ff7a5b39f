"""Benchmark of bidirectional attention over packed variable-length rows (forward + backward).

On the GPU (only when CUDA exists): vrpo's Triton kernels, flash-attn 2's ``flash_attn_varlen_func``
(when installed) and SDPA with the block-diagonal mask, at B=8 rows of 4096 packed tokens, 32
heads, d=128, bfloat16, timed with ``triton.testing.do_bench``; throughput in TFLOP/s of useful
work (``14 * D * H * sum(len^2)``: the forward's two matmuls plus the usual 2.5x for the backward,
over the attended pairs only) and as a fraction of the card's measured bf16 matmul rate.

On the CPU: ``impl="torch"`` (SDPA with the block-diagonal mask), ``impl="eager"`` (matmul and
softmax) and the float64 reference, for correctness and memory (CPU speed is not the point), plus
the Triton kernels when ``TRITON_INTERPRET=1`` is set and the shape is the toy one.

Each row: implementation, shape, median / p20 / p80 time (ms), peak extra memory (bytes allocated
during one forward+backward on top of the inputs), max abs error of the output and of the input
gradients against the float64 reference (on row 0 on the GPU, where a full float64 reference would
not fit).

    python -m benchmarks.attention            # GPU if present, else CPU
    python -m benchmarks.attention --toy      # seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from vrpo_kernels.attention import attention_reference, bidirectional_attention
from vrpo_kernels.dispatch import interpreting, triton_available

GPU_SHAPE = dict(batch=8, seq_len=4096, n_heads=32, head_dim=128, min_len=128, max_len=1536)
CPU_SHAPE = dict(batch=2, seq_len=512, n_heads=8, head_dim=64, min_len=16, max_len=192)
TOY_SHAPE = dict(batch=2, seq_len=40, n_heads=2, head_dim=16, min_len=1, max_len=17)


def packed_segments(batch, seq_len, min_len, max_len, seed=0):
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


def segment_runs(segment_ids):
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


def useful_flops(segment_ids, n_heads, head_dim):
    """Forward + backward FLOPs over the attended (query, key) pairs only."""
    pairs = sum(n * n for row in segment_runs(segment_ids) for _, n in row)
    return 14 * head_dim * n_heads * pairs


def _quantiles_ms(times_s):
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), q[1], q[7]


def _time_cpu(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _quantiles_ms(times)


def _peak_memory_cpu(fn):
    """Peak live bytes allocated by torch during fn (from the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _peak_memory_cuda(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _leaf(t):
    return t.detach().requires_grad_()


def _reference_row(q, k, v, grad, segment_ids, row, scale):
    """float64 output and input gradients of one row, computed one segment at a time."""
    out = torch.zeros(q.shape[1:], dtype=torch.float64, device=q.device)
    grads = [torch.zeros(t.shape[1:], dtype=torch.float64, device=q.device) for t in (q, k, v)]
    for start, n in segment_runs(segment_ids[row:row + 1])[0]:
        s = slice(start, start + n)
        leaves = [_leaf(t[row:row + 1, :, s]) for t in (q, k, v)]
        ref = attention_reference(*leaves, scale=scale)
        ref.backward(grad[row:row + 1, :, s].double())
        out[:, s] = ref[0].detach()
        for acc, leaf in zip(grads, leaves):
            acc[:, s] = leaf.grad[0].double()
    return out, grads


def _flash_attn_impl(q, k, v, grad, segment_ids):
    """flash_attn_varlen_func on the non-padding tokens, packed [total, H, D] with cu_seqlens.

    Returns (leaves, forward, grad_out, unpack); unpack(x) maps a packed [total, H, D] tensor back
    to [B, H, S, D] (zeros at padding) for the error check.
    """
    from flash_attn import flash_attn_varlen_func

    B, H, S, D = q.shape
    valid = (segment_ids >= 0).flatten().nonzero()[:, 0]
    lengths = [n for row in segment_runs(segment_ids) for _, n in row]
    cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)

    def pack(t):
        return _leaf(t.transpose(1, 2).reshape(B * S, t.shape[1], D)[valid])

    pq, pk, pv = pack(q), pack(k), pack(v)

    def unpack(x):
        full = x.new_zeros(B * S, x.shape[1], D)
        full[valid] = x
        return full.view(B, S, x.shape[1], D).transpose(1, 2)

    def forward():
        return flash_attn_varlen_func(pq, pk, pv, cu, cu, max(lengths), max(lengths), causal=False)

    return (pq, pk, pv), forward, pack(grad).detach(), unpack


def run(toy=False, device=None, shape=None, seed=0, reps=None):
    """Run the benchmark and return its rows (a list of dicts). See the module docstring."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    shape = dict(shape or (TOY_SHAPE if toy else GPU_SHAPE if on_gpu else CPU_SHAPE))
    dtype = torch.bfloat16 if on_gpu else torch.float32
    B, S, H, D = shape["batch"], shape["seq_len"], shape["n_heads"], shape["head_dim"]
    segment_ids = packed_segments(B, S, shape["min_len"], shape["max_len"], seed).to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    flops = useful_flops(segment_ids.cpu(), H, D)
    n_segments = sum(map(len, segment_runs(segment_ids.cpu())))
    shape_str = f"B={B} S={S} H={H} D={D} {str(dtype).removeprefix('torch.')} segs={n_segments}"

    impls = {}  # name -> (leaves, forward, grad_out, unpack or None)

    def with_impl(impl):
        leaves = [_leaf(t) for t in (q, k, v)]
        forward = lambda: bidirectional_attention(*leaves, segment_ids, scale=scale, impl=impl)  # noqa: E731
        return leaves, forward, grad, None

    if on_gpu:
        impls["vrpo triton"] = with_impl("triton")
        try:
            impls["flash-attn 2 varlen"] = _flash_attn_impl(q, k, v, grad, segment_ids)
        except ImportError:
            pass
        impls["sdpa (block mask)"] = with_impl("torch")
    else:
        impls["torch (sdpa, block mask)"] = with_impl("torch")
        impls["eager (matmul, softmax)"] = with_impl("eager")
        leaves = [_leaf(t) for t in (q, k, v)]
        forward = lambda: attention_reference(*leaves, segment_ids, scale)  # noqa: E731
        impls["float64 reference"] = (leaves, forward, grad, None)
        if toy and interpreting() and triton_available():
            impls["triton (interpreter)"] = with_impl("triton")

    # The float64 reference: whole batch on the CPU, row 0 on the GPU.
    if on_gpu:
        ref_rows = [0]
        ref = [_reference_row(q, k, v, grad, segment_ids, 0, scale)]
    else:
        ref_rows = list(range(B))
        ref = [_reference_row(q, k, v, grad, segment_ids, b, scale) for b in ref_rows]

    rows, steps = [], []
    for name, (leaves, forward, grad_out, unpack) in impls.items():
        def step(leaves=leaves, forward=forward, grad_out=grad_out):
            for leaf in leaves:
                leaf.grad = None
            out = forward()
            out.backward(grad_out.to(out.dtype))
            return out

        out = step()
        out_full = out.detach() if unpack is None else unpack(out.detach())
        grads_full = [leaf.grad if unpack is None else unpack(leaf.grad) for leaf in leaves]
        err_out = max((out_full[b].double() - r[0]).abs().max().item() for b, r in zip(ref_rows, ref))
        err_grad = max((gr[b].double() - rg).abs().max().item()
                       for b, r in zip(ref_rows, ref) for gr, rg in zip(grads_full, r[1]))

        if on_gpu:
            import triton.testing

            median, p20, p80 = triton.testing.do_bench(step, grad_to_none=leaves, quantiles=[0.5, 0.2, 0.8])
        else:
            median, p20, p80 = _time_cpu(step, reps or (3 if toy else 5))
        rows.append(dict(
            implementation=name, shape=shape_str, median_ms=median, p20_ms=p20, p80_ms=p80,
            peak_extra_bytes=None, max_err_out=err_out, max_err_grad=err_grad,
            tflops=flops / (median * 1e-3) / 1e12,
        ))
        steps.append((step, leaves))

    # Memory after all timings: the CPU profiler slows down the operators that run after it.
    for row, (step, leaves) in zip(rows, steps):
        for leaf in leaves:  # so that freeing the last gradients does not offset the new ones
            leaf.grad = None
        if on_gpu:
            row["peak_extra_bytes"] = _peak_memory_cuda(step)
        elif not row["implementation"].startswith("triton (interpreter)"):
            # The interpreter allocates in numpy, which torch's profiler does not see.
            row["peak_extra_bytes"] = _peak_memory_cpu(step)

    if on_gpu:
        rate = matmul_tflops(dtype)
        for r in rows:
            r["fraction_of_matmul"] = r["tflops"] / rate
            r["matmul_tflops"] = rate
    return rows


def matmul_tflops(dtype=torch.bfloat16, n=8192):
    """The card's measured dense matmul rate (TFLOP/s) at n x n x n, the yardstick for attention."""
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def format_table(rows):
    cols = ["implementation", "shape", "median_ms", "p20_ms", "p80_ms", "peak_extra_bytes", "max_err_out",
            "max_err_grad", "tflops"]
    if rows and "fraction_of_matmul" in rows[0]:
        cols.append("fraction_of_matmul")

    def fmt(x):
        if x is None:
            return "n/a"
        if isinstance(x, float):
            return f"{x:.3g}"
        if isinstance(x, int):
            return f"{x / 2**20:.1f} MiB"
        return str(x)

    table = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny shapes that run in seconds")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(toy=args.toy, device=args.device)
    print(format_table(rows))
    if rows and "matmul_tflops" in rows[0]:
        print(f"bf16 matmul rate measured on this card: {rows[0]['matmul_tflops']:.0f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
