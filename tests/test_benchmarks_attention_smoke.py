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


def test_flash_attn_packing_round_trip(monkeypatch):
    """The flash-attn row's glue (pack to [total, H, D], cu_seqlens, unpack), with a stand-in kernel.

    flash-attn needs a GPU; the stand-in runs each cu_seqlens segment through SDPA on the CPU, so the
    packing and unpacking the GPU benchmark relies on is checked here against the float64 reference.
    """
    import sys
    import types

    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert not causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        calls.append(cu_q.tolist())
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert b - a <= max_q
            seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n, D]
            outs.append(torch.nn.functional.scaled_dot_product_attention(*seg)[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    segment_ids = bench.packed_segments(2, 30, 3, 9, seed=2)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 30, 16, generator=g) for _ in range(4))
    leaves, forward, grad_out, unpack = bench._flash_attn_impl(q, k, v, grad, segment_ids)
    out = forward()
    out.backward(grad_out)
    lengths = torch.tensor([n for row in bench.segment_runs(segment_ids) for _, n in row])
    assert calls[0] == [0] + lengths.cumsum(0).tolist()
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref = bench.attention_reference(*ref_leaves, segment_ids)
    ref.backward(grad.double())
    torch.testing.assert_close(unpack(out.detach()).double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(unpack(leaf.grad).double(), ref_leaf.grad, atol=1e-5, rtol=1e-5)
