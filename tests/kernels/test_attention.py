"""Bidirectional varlen attention: the Triton kernels (interpreter), the PyTorch paths, the AOT build.

Every implementation is checked, forward and backward, against a float64 reference written out
segment by segment in this file (not the library's own eager path). The Triton kernels run under
TRITON_INTERPRET=1 (set in conftest.py) with small shapes and the interpreter tiles (16/32 rows), so
that the shapes below cross block boundaries, have sequences shorter than a block and lengths that
are not multiples of one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrpo_kernels import bidirectional_attention
from vrpo_kernels.attention import (
    AttentionConfig,
    FlashAttentionFunction,
    KernelConfig,
    attention_triton,
    segment_layout,
)

# float32 in the interpreter (numpy matmuls) against float64: the error is float32 rounding.
FP32_INTERP = dict(atol=2e-6, rtol=1e-5, grad_atol=2e-5, grad_rtol=1e-4)

# Tiles transposed with respect to the default interpreter config (fwd/dq 16x32, dkdv 32x16):
# together the two cover BLOCK_M < BLOCK_N and BLOCK_M > BLOCK_N in every kernel.
_TRANSPOSED_TILES = AttentionConfig(
    fwd=KernelConfig(16, 32, 4, 1),
    delta=KernelConfig(16, 0, 4, 1),
    dkdv=KernelConfig(32, 16, 4, 1),
    dq=KernelConfig(16, 32, 4, 1),
)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _row_segments(rng, S, max_len, pad_tail, pad_between, shuffle_ids):
    """One row of segment ids: ragged runs (lengths 1..max_len), optional padding (-1) runs."""
    ids, next_id = [], 0
    body = S - pad_tail
    while len(ids) < body:
        n = int(torch.randint(1, max_len + 1, (1,), generator=rng))
        ids += [next_id] * min(n, body - len(ids))
        next_id += 1
        if pad_between and len(ids) < body and torch.rand(1, generator=rng) < 0.3:
            ids += [-1] * min(2, body - len(ids))
    ids += [-1] * pad_tail
    row = torch.tensor(ids, dtype=torch.int64)
    if shuffle_ids and next_id > 0:
        # Ids need not increase along the row; only equality and sign matter.
        perm = torch.randperm(next_id, generator=rng) * 7 + 3
        row = torch.where(row >= 0, perm[row.clamp(min=0)], row)
    return row


def _inputs(B, Hq, Hkv, S, D, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype).requires_grad_(requires_grad)
    return q, k, v


def attention_reference(q, k, v, segment_ids=None, scale=None):
    """float64 attention written out segment by segment, independent of the library's code paths
    (it deliberately shadows ``vrpo_kernels.attention.attention_reference``, which runs attention_eager).

    For each row and each non-negative id, the queries holding that id attend to the keys holding it:
    ``softmax(q k^T * scale) v`` over those keys only (ids need not be contiguous). Tokens with a
    negative id (padding) get zeros. Query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
    ``scale`` defaults to ``1 / sqrt(D)``. Differentiable; gradients reach q, k, v in their dtypes.
    """
    B, Hq, S, D = q.shape
    group = Hq // k.shape[1]
    q64 = q.double()
    k64, v64 = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    ids = torch.zeros(B, S, dtype=torch.int64) if segment_ids is None else segment_ids
    rows = []
    for b in range(B):
        out = q64.new_zeros(Hq, S, D)
        for sid in ids[b].unique().tolist():
            if sid < 0:
                continue
            idx = (ids[b] == sid).nonzero()[:, 0]
            scores = (q64[b][:, idx] @ k64[b][:, idx].transpose(-1, -2)) * scale
            weights = (scores - scores.amax(-1, keepdim=True)).exp()
            weights = weights / weights.sum(-1, keepdim=True)
            out = out.index_copy(1, idx, weights @ v64[b][:, idx])
        rows.append(out)
    return torch.stack(rows)


def _check_against_reference(out, q, k, v, segment_ids, scale, atol, rtol, grad_atol, grad_rtol, seed=0):
    ref = attention_reference(q, k, v, segment_ids, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(
            a.double(), b.double(), atol=grad_atol, rtol=grad_rtol, msg=lambda m, name=name: f"d{name}: {m}"
        )
    if segment_ids is not None:
        pad = segment_ids < 0
        assert torch.all(out.detach()[pad[:, None, :, None].expand_as(out)] == 0)
        assert torch.all(grads[0][pad[:, None, :, None].expand_as(grads[0])] == 0)
        kv_pad = pad[:, None, :, None].expand_as(grads[1])
        assert torch.all(grads[1][kv_pad] == 0) and torch.all(grads[2][kv_pad] == 0)


@st.composite
def attention_cases(draw, max_s=40):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    # Half of the draws span several 16/32-row tiles; hypothesis otherwise favours tiny rows.
    S = draw(st.integers(1, max_s) | st.integers(max_s // 2, max_s))
    D = draw(st.sampled_from([16, 32]))
    mode = draw(st.sampled_from(["none", "ragged", "ragged", "padded"]))
    scale = draw(st.sampled_from([None, None, 0.05, 0.4, 1.3]))
    seed = draw(st.integers(0, 2**16))
    segment_ids = None
    if mode != "none":
        rng = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(B):
            pad_tail = draw(st.integers(0, S)) if mode == "padded" else 0
            max_len = draw(st.sampled_from([1, 5, 17, 40]))
            rows.append(_row_segments(rng, S, max_len, pad_tail, draw(st.booleans()), draw(st.booleans())))
        segment_ids = torch.stack(rows)
    return B, Hkv * group, Hkv, S, D, segment_ids, scale, seed


# --------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# --------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@settings(max_examples=60)
@given(case=attention_cases(), transposed=st.booleans())
def test_triton_matches_reference(case, transposed):
    B, Hq, Hkv, S, D, segment_ids, scale, seed = case
    q, k, v = _inputs(B, Hq, Hkv, S, D, torch.float32, seed)
    out = attention_triton(q, k, v, segment_ids, scale, config=_TRANSPOSED_TILES if transposed else None)
    _check_against_reference(out, q, k, v, segment_ids, scale, **FP32_INTERP)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "lengths, S",
    [
        ([1] * 7, 7),  # every segment has length 1; the row is shorter than one block
        ([5], 5),  # one sequence shorter than a block
        ([3, 1, 14, 1, 17, 1], 37),  # ragged, not a multiple of the block, segments across blocks
        ([16, 16, 1], 40),  # block-aligned segments, then padding (7 tokens) at the end
    ],
)
def test_triton_named_shapes(lengths, S):
    ids = sum(([i] * n for i, n in enumerate(lengths)), [])
    segment_ids = torch.tensor([ids + [-1] * (S - len(ids))] * 2)
    q, k, v = _inputs(2, 4, 2, S, 32, torch.float32, seed=len(lengths))
    out = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    _check_against_reference(out, q, k, v, segment_ids, None, **FP32_INTERP)


@pytest.mark.interpreter
def test_triton_float16():
    segment_ids = torch.tensor([[0] * 9 + [1] * 20 + [-1] * 4])
    q, k, v = _inputs(1, 2, 1, 33, 32, torch.float16, seed=3)
    out = bidirectional_attention(q, k, v, segment_ids, scale=0.2, impl="triton")
    # P and dS are rounded to float16 before their matmuls, as on the GPU.
    _check_against_reference(out, q, k, v, segment_ids, 0.2, atol=2e-3, rtol=2e-3, grad_atol=1e-2, grad_rtol=1e-2)


# bfloat16 in the interpreter: the kernels upcast the tiles right before tl.dot (the interpreter's
# bf16 dot is wrong by orders of magnitude), so every bf16 load, store and rounding runs as on the GPU.
# The error bound, with u = 2^-8 (bf16 unit roundoff): P (and dS) are rounded to bf16 before their
# matmuls (a relative u on a convex combination of V rows: u * max|.|), the result is rounded once more
# on the store (u / 2); 3u * max|reference| bounds both with margin, plus rtol 2u.
BF16_U = 2.0**-8


def _assert_close_bf16(got, want, name):
    bound = 3 * BF16_U * float(want.detach().abs().max())
    torch.testing.assert_close(got.double(), want.double(), atol=bound, rtol=2 * BF16_U, msg=lambda m: f"{name}: {m}")


@pytest.mark.interpreter
@pytest.mark.parametrize("D, Hq, Hkv", [(32, 4, 2), (24, 2, 2)])
def test_triton_bfloat16_matches_reference(D, Hq, Hkv):
    """bf16 forward and backward against float64, GQA and a padded head dim, on [B, S, H, D] views."""
    B, S = 1, 43
    g = torch.Generator().manual_seed(D)
    q, k, v = (
        torch.randn(B, S, h, D, generator=g).to(torch.bfloat16).transpose(1, 2).requires_grad_() for h in (Hq, Hkv, Hkv)
    )
    segment_ids = torch.tensor([[0] * 9 + [1] * 30 + [-1] * 4])
    out = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    ref = attention_reference(q, k, v, segment_ids)
    assert out.dtype == torch.bfloat16
    _assert_close_bf16(out, ref, "out")
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == torch.bfloat16
        _assert_close_bf16(a, b, name)


@pytest.mark.interpreter
def test_triton_output_and_gradients_keep_the_model_layout():
    """The output is written as [B, S, H, D] (what the output projection reads: no transpose copy), and
    the gradients of [B, S, H, D] views come back in that layout (no copy in the projections' backward)."""
    B, S, H, D = 1, 20, 2, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, S, H, D, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    out = bidirectional_attention(q, k, v, impl="triton")
    assert out.shape == (B, H, S, D) and out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for gr, x in zip(grads, (q, k, v)):
        assert gr.stride() == x.stride()


@pytest.mark.interpreter
def test_triton_head_dim_not_power_of_two_and_strided_inputs():
    """D = 24 is padded to 32 in the kernel; q/k/v come as transposes of [B, S, H, D] (transformers)."""
    B, S, Hq, Hkv, D = 2, 21, 4, 2, 24
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, S, Hq, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    segment_ids = torch.tensor([[0] * 4 + [1] * 17, [2] * 20 + [-5]])
    out = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    _check_against_reference(out, q, k, v, segment_ids, None, **FP32_INTERP)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("clean", [slice(0, 16), slice(48, 55)])
def test_triton_skips_blocks_outside_the_segments(clean):
    """Key blocks of other samples and padding-only blocks are never read.

    With 16-token tiles the row is: segment 0 (block 0), segment 1 (block 1), padding (block 2),
    segment 2 (7 tokens, a partial block 3). Keys and values are NaN everywhere except in the
    `clean` segment; its outputs and gradients stay finite and exact only if its query and key
    blocks never visit another block.
    """
    S = 55
    segment_ids = torch.tensor([[0] * 16 + [1] * 16 + [-1] * 16 + [2] * 7])
    q, k, v = _inputs(1, 2, 2, S, 16, torch.float32, seed=7, requires_grad=False)
    keep = torch.zeros(S, dtype=torch.bool)
    keep[clean] = True
    for t in (k, v):
        t[:, :, ~keep] = float("nan")
    for t in (q, k, v):
        t.requires_grad_()
    tiles = KernelConfig(16, 16, 4, 1)
    out = attention_triton(q, k, v, segment_ids, config=AttentionConfig(tiles, tiles, tiles, tiles))
    ref = attention_reference(q[:, :, clean], k[:, :, clean], v[:, :, clean])
    torch.testing.assert_close(out[:, :, clean].double(), ref, atol=2e-6, rtol=1e-5)
    assert torch.all(out[:, :, 32:48] == 0)  # padding queries: nothing visited, exact zeros
    g = torch.zeros_like(out)
    g[:, :, clean] = 1.0
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g[:, :, clean].double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a[:, :, clean].double(), b[:, :, clean].double(), atol=2e-5, rtol=1e-4)
    assert torch.all(grads[1][:, :, 32:48] == 0) and torch.all(grads[2][:, :, 32:48] == 0)


@pytest.mark.interpreter
def test_triton_forward_only_keeps_nothing(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 20, 16, torch.float32, seed=1)
    segment_ids = torch.tensor([[0] * 12 + [1] * 8])
    with_grad = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    assert with_grad.grad_fn is not None and "FlashAttentionFunction" in type(with_grad.grad_fn).__name__

    def no_autograd(*args, **kwargs):
        raise AssertionError("the forward-only path must not go through the autograd Function")

    monkeypatch.setattr(FlashAttentionFunction, "apply", no_autograd)
    with torch.no_grad():
        out = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    assert out.grad_fn is None and not out.requires_grad
    with torch.inference_mode():
        out_inf = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    detached = bidirectional_attention(q.detach(), k.detach(), v.detach(), segment_ids, impl="triton")
    assert detached.grad_fn is None
    assert torch.equal(out, with_grad.detach()) and torch.equal(out_inf, out) and torch.equal(detached, out)


@pytest.mark.interpreter
@pytest.mark.parametrize("wants", ["q", "kv", "v"])
def test_triton_partial_gradients(wants):
    """Only the needed backward kernels run; the gradients that are asked for are still exact."""
    segment_ids = torch.tensor([[0] * 10 + [1] * 13 + [-1] * 3])
    q, k, v = _inputs(1, 4, 2, 26, 16, torch.float32, seed=4, requires_grad=False)
    leaves = {"q": q, "k": k, "v": v}
    for name in wants:
        leaves[name].requires_grad_()
    out = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    ref = attention_reference(q, k, v, segment_ids)
    inputs = [leaves[name] for name in wants]
    got = torch.autograd.grad(out, inputs, torch.ones_like(out))
    want = torch.autograd.grad(ref, inputs, torch.ones_like(ref))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Segment layout
# --------------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(
    rows=st.lists(st.lists(st.integers(-2, 4), min_size=1, max_size=24), min_size=1, max_size=3).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    )
)
def test_segment_layout_matches_brute_force(rows):
    """Spans cover every occurrence of an id (also when ids are not contiguous); ranks keep equality."""
    segment_ids = torch.tensor(rows)
    seg, lo, hi = segment_layout(segment_ids)
    assert seg.dtype == lo.dtype == hi.dtype == torch.int32
    S = segment_ids.shape[1]
    for b, row in enumerate(rows):
        for i, x in enumerate(row):
            if x < 0:
                assert (seg[b, i], lo[b, i], hi[b, i]) == (-1, S, 0)
                continue
            where = [j for j, y in enumerate(row) if y == x]
            assert (lo[b, i], hi[b, i]) == (where[0], where[-1] + 1)
            for j, y in enumerate(row):
                assert (seg[b, i] == seg[b, j]) == (y == x)
            assert seg[b, i] >= 0


def test_segment_layout_is_computed_once_per_tensor():
    """Layers share one segment_ids tensor; its layout is reused until the tensor changes in place."""
    from vrpo_kernels.attention import _kernel_segments

    segment_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    first = _kernel_segments(segment_ids, 1, 6, segment_ids.device)
    assert _kernel_segments(segment_ids, 1, 6, segment_ids.device) is first
    segment_ids[0, 1] = 1
    changed = _kernel_segments(segment_ids, 1, 6, segment_ids.device)
    assert changed is not first
    for got, want in zip(changed, segment_layout(segment_ids)):
        assert torch.equal(got, want)
    equal_copy = segment_ids.clone()
    assert _kernel_segments(equal_copy, 1, 6, segment_ids.device) is not changed


@pytest.mark.interpreter
def test_triton_non_contiguous_and_wide_ids():
    """Ids that recur after another sample are still exact (wider spans); int64 ids beyond int32 work."""
    big = 2**40
    segment_ids = torch.tensor([[big, big, 3, 3, 3, big, -1, 3, 7, 7, 7, -big, big + 1, 3, 3, 3, 3, 3]])
    q, k, v = _inputs(1, 2, 1, 18, 16, torch.float32, seed=11)
    out = bidirectional_attention(q, k, v, segment_ids, impl="triton")
    _check_against_reference(out, q, k, v, segment_ids, None, **FP32_INTERP)


# --------------------------------------------------------------------------------------------------
# PyTorch paths and the entry point
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(case=attention_cases(max_s=70), impl=st.sampled_from(["torch", "eager"]))
def test_torch_paths_match_reference_fp32(case, impl):
    B, Hq, Hkv, S, D, segment_ids, scale, seed = case
    q, k, v = _inputs(B, Hq, Hkv, S, D, torch.float32, seed)
    out = bidirectional_attention(q, k, v, segment_ids, scale, impl=impl)
    _check_against_reference(out, q, k, v, segment_ids, scale, atol=1e-5, rtol=1e-5, grad_atol=5e-5, grad_rtol=1e-4)


@settings(max_examples=15)
@given(case=attention_cases(max_s=70))
def test_torch_path_matches_reference_bf16(case):
    B, Hq, Hkv, S, D, segment_ids, scale, seed = case
    q, k, v = _inputs(B, Hq, Hkv, S, D, torch.bfloat16, seed)
    out = bidirectional_attention(q, k, v, segment_ids, scale, impl="torch")
    _check_against_reference(out, q, k, v, segment_ids, scale, atol=3e-2, rtol=3e-2, grad_atol=1e-1, grad_rtol=5e-2)


def test_auto_is_torch_on_cpu(monkeypatch):
    import vrpo_kernels.attention as attention
    from vrpo_kernels.attention import op  # where bidirectional_attention looks its paths up

    def no_triton(*args, **kwargs):
        raise AssertionError("impl='auto' must not pick the Triton path for CPU tensors")

    monkeypatch.setattr(op, "attention_triton", no_triton)
    q, k, v = _inputs(1, 2, 1, 6, 16, torch.float32, seed=0, requires_grad=False)
    torch.testing.assert_close(bidirectional_attention(q, k, v), attention.attention_torch(q, k, v))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.zeros(2, 4, 8)), "q must be 4-D"),
        (dict(k=torch.zeros(1, 3, 8, 16), v=torch.zeros(1, 3, 8, 16)), "multiple of the number of key/value"),
        (dict(v=torch.zeros(1, 2, 8, 32)), "k .* and v .* must have the same shape"),
        (dict(k=torch.zeros(1, 2, 9, 16), v=torch.zeros(1, 2, 9, 16)), "does not match q"),
        (dict(k=torch.zeros(1, 2, 8, 16).double(), v=torch.zeros(1, 2, 8, 16).double()), "share a dtype"),
        (dict(segment_ids=torch.zeros(1, 7, dtype=torch.long)), "segment_ids must have shape"),
        (dict(segment_ids=torch.zeros(1, 8)), "segment_ids must be an integer tensor"),
        (dict(scale=float("nan")), "scale must be a finite"),
        (dict(impl="flash"), "impl='flash' is not one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        bidirectional_attention(**args)


def test_auto_falls_back_to_torch_above_head_dim_128(monkeypatch, caplog):
    """impl='auto' on a GPU with head dim 256: the torch path, logged once at WARNING, not an error."""
    import vrpo_kernels.attention as attention
    from vrpo_kernels.attention import op  # where bidirectional_attention looks its paths up

    def no_triton(*args, **kwargs):
        raise AssertionError("impl='auto' must not launch the Triton kernels above head dim 128")

    monkeypatch.setattr(op, "resolve_impl", lambda impl, *a, **k: "triton" if impl == "auto" else impl)
    monkeypatch.setattr(op, "attention_triton", no_triton)
    attention._warn_fallback_once.cache_clear()
    q = torch.randn(1, 2, 5, 256, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="vrpo_kernels.attention"):
        for _ in range(2):
            torch.testing.assert_close(bidirectional_attention(q, q, q), attention.attention_torch(q, q, q))
    warnings = [r for r in caplog.records if "head dim 256 exceeds 128" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_model_glue_builds_one_segment_tensor_per_forward():
    """Every layer gets the same padding mask; the glue hands the kernels the same segment tensor (so its
    layout is computed once), and a new one after the mask changes in place."""
    from vrpo.models.attention import _segments_for

    query = torch.zeros(1, 2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    first = _segments_for(query, mask, None)
    assert _segments_for(query, mask, None) is first
    assert torch.equal(first, torch.tensor([[0, 0, 0, -1, -1]]))
    mask[0, 3] = 1
    assert torch.equal(_segments_for(query, mask, None), torch.tensor([[0, 0, 0, 0, -1]]))


@pytest.mark.interpreter
def test_triton_rejects_unsupported_head_dim():
    q = torch.zeros(1, 1, 4, 256)
    with pytest.raises(ValueError, match="head dim 256 exceeds 128"):
        bidirectional_attention(q, q, q, impl="triton")


# The sm_90 ahead-of-time build of aot_specs() is checked with every other kernel in tests/kernels/test_aot.py.
