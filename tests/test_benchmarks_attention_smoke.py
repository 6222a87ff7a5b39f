"""Smoke test of benchmarks/attention.py at the toy size (CPU; the Triton rows run in the interpreter)."""

from __future__ import annotations

import torch

from benchmarks import attention as bench


def test_packing_and_flop_count():
    segment_ids = bench.packed_segments(3, 64, 5, 20, seed=1)
    assert segment_ids.shape == (3, 64)
    runs = bench.segment_runs(segment_ids)
    for row, row_runs in zip(segment_ids.tolist(), runs):
        assert all(5 <= n <= 20 for _, n in row_runs)
        covered = sum(n for _, n in row_runs)
        assert all(x == -1 for x in row[covered:]) and all(x >= 0 for x in row[:covered])
        assert 64 - covered < 20  # packing stops only when the next sample does not fit
    pairs = sum(n * n for row_runs in runs for _, n in row_runs)
    assert bench.useful_flops(segment_ids, n_heads=2, head_dim=16) == 14 * 16 * 2 * pairs


def test_toy_benchmark_runs_and_is_correct():
    rows = bench.run(toy=True, device="cpu", reps=1)
    names = [r["implementation"] for r in rows]
    assert names == [
        "torch (sdpa, block mask)", "eager (matmul, softmax)", "float64 reference", "triton (interpreter)"
    ]
    shape = bench.TOY_SHAPE
    scores_bytes = shape["batch"] * shape["n_heads"] * shape["seq_len"] ** 2 * 4
    for r in rows:
        assert r["max_err_out"] < 1e-5 and r["max_err_grad"] < 1e-5, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    by_name = dict(zip(names, rows))
    # eager materialises the float32 scores and probabilities; the reference does so in float64.
    assert by_name["eager (matmul, softmax)"]["peak_extra_bytes"] >= scores_bytes
    assert by_name["float64 reference"]["peak_extra_bytes"] >= 2 * scores_bytes
    assert by_name["triton (interpreter)"]["peak_extra_bytes"] is None
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) and "float64 reference" in table
    assert torch.tensor([r["tflops"] for r in rows]).gt(0).all()
