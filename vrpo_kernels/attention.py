"""Bidirectional (non-causal) attention over packed, variable-length rows.

``segment_ids`` [B, S] (int) says which sample each token belongs to: a query attends only to keys
with the same segment id. Tokens with a negative segment id are padding: they attend to nothing,
nobody attends to them, their output is 0 and their gradients are 0. ``segment_ids=None`` means one
sample per row.

Segments are expected to be contiguous runs of a row (packing puts samples side by side), which is
what makes block skipping tight. A row whose ids are not contiguous (``[0, 0, 1, 1, 0]``) is still
computed exactly: every token gets the span from the first to the last occurrence of its id, the
kernels visit the key blocks that cover the spans of their queries, and the mask inside a block is
element-wise. Only the skipping becomes less effective.

Implementations (one entry point, :func:`bidirectional_attention`, with ``impl=``):

* ``"triton"``: flash attention (online softmax, log-sum-exp saved for the backward pass) in the
  kernels below. A query block loops only over the key blocks that overlap the spans of its
  queries' segments, so cross-sample blocks and padding-only blocks cost nothing.
* ``"torch"``: :func:`torch.nn.functional.scaled_dot_product_attention` with the block-diagonal mask.
* ``"eager"``: matmul, masked softmax, matmul; :func:`attention_reference` runs it in float64.

Supported by the Triton path: float16 and bfloat16 on the GPU, and float32 in the interpreter
(``TRITON_INTERPRET=1``, for tests; on the GPU a float32 tl.dot either rounds to tf32 or spills
heavily, so ``impl="auto"`` sends float32 CUDA tensors to ``"torch"``). Head dims up to 128: a head
dim that is not a power of two is padded to the next one (at least 16) inside the kernels; the
tiles are tuned for 64 and 128 (LLaDA 8B) on sm_90, and 16 and 32 use the 64 tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import weakref

import torch
import torch.nn.functional as F

from ._triton_utils import aot_spec, on_device, upcast_dots
from .dispatch import cuda_rules, interpreting, resolve_impl, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_utils import dot
else:  # pragma: no cover - platforms without triton wheels
    triton = None

logger = logging.getLogger(__name__)

_IMPLS = ("auto", "triton", "torch", "eager")
_LOG2E = 1.4426950408889634
MAX_TRITON_HEAD_DIM = 128


# --------------------------------------------------------------------------------------------------
# Input checks shared by every implementation
# --------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, segment_ids, scale):
    op = "bidirectional_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    B, Hq, S, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, D):
        raise ValueError(
            f"{op}: k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, sequence length or head dim"
        )
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(
            f"{op}: the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({k.shape[1]})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor):
            raise TypeError(f"{op}: segment_ids must be a tensor or None, got {type(segment_ids).__name__}")
        if segment_ids.shape != (B, S):
            raise ValueError(f"{op}: segment_ids must have shape [B, S] = {[B, S]}, got {list(segment_ids.shape)}")
        if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
            raise ValueError(f"{op}: segment_ids must be an integer tensor, got {segment_ids.dtype}")
        if segment_ids.device != q.device:
            raise ValueError(f"{op}: segment_ids is on {segment_ids.device} but q is on {q.device}")
    if scale is not None:
        if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"{op}: scale must be a finite Python number or None, got {scale!r}")


def _default_scale(scale, head_dim):
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------------------------------
# PyTorch paths and the float64 reference
# --------------------------------------------------------------------------------------------------


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S]: True where query i may attend to key j (same, non-negative segment)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids >= 0)[:, :, None] & (segment_ids >= 0)[:, None, :]
    return (same & valid)[:, None]


def _repeat_kv(q, k, v):
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return k, v


def attention_torch(q, k, v, segment_ids=None, scale=None):
    """SDPA with a block-diagonal mask. q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]."""
    k, v = _repeat_kv(q, k, v)
    if segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = segment_mask(segment_ids)
    # A padding query has no allowed key; give it its own diagonal so softmax stays finite,
    # then zero its output.
    pad = segment_ids < 0
    eye = torch.eye(segment_ids.shape[1], dtype=torch.bool, device=q.device)
    allowed = allowed | (pad[:, None, :, None] & eye)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.masked_fill(pad[:, None, :, None], 0.0)


def attention_eager(q, k, v, segment_ids=None, scale=None):
    """Plain matmul / masked softmax / matmul in q's dtype. Same shapes as :func:`attention_torch`.

    Materialises the [B, Hq, S, S] scores; for tests and the CPU benchmark, not for training.
    """
    k, v = _repeat_kv(q, k, v)
    scores = (q @ k.transpose(-1, -2)) * _default_scale(scale, q.shape[-1])
    if segment_ids is None:
        return scores.softmax(dim=-1) @ v
    allowed = segment_mask(segment_ids)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    # Padding rows are all -inf, hence NaN after softmax; masked_fill replaces every entry of them.
    probs = probs.masked_fill(~allowed, 0.0)
    return probs @ v


def attention_reference(q, k, v, segment_ids=None, scale=None):
    """float64 reference for tests: :func:`attention_eager` on float64 copies. Returns float64.

    Differentiable: gradients flow back to q, k, v (in their own dtypes).
    """
    return attention_eager(q.double(), k.double(), v.double(), segment_ids, scale)


# --------------------------------------------------------------------------------------------------
# Segment spans: which keys a block of queries (or queries a block of keys) can possibly see
# --------------------------------------------------------------------------------------------------


def segment_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' view of ``segment_ids`` [B, S]: (seg, lo, hi), int32 [B, S] each.

    seg: the rank of each token's id among the distinct non-negative ids of its row, or -1 for
    padding (any width of integer id fits in int32 this way). lo, hi: the first position and one past
    the last position of the token's id in its row; padding gets lo = S and hi = 0, neutral for the
    min/max the kernels take over a block.

    Works for non-contiguous ids too (the span then covers every occurrence). Sort-based, with no
    host synchronisation, so it is cheap on the GPU: O(S log S) per row against O(S^2 D) attention.
    """
    B, S = segment_ids.shape
    device = segment_ids.device
    ids, perm = torch.sort(segment_ids, dim=1, stable=True)
    idx = torch.arange(S, device=device).expand(B, S)
    starts = torch.ones(B, S, dtype=torch.bool, device=device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    group_first = torch.where(starts, idx, 0).cummax(dim=1).values
    group_last = torch.where(ends, idx, S - 1).flip(1).cummin(dim=1).values.flip(1)
    # A stable sort keeps the positions of one id in increasing order, so the first and last
    # element of each group in `perm` are the first and last occurrence of that id.
    lo = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, group_first))
    hi = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, group_last) + 1)
    rank = torch.empty_like(perm).scatter_(1, perm, starts.long().cumsum(dim=1))
    pad = segment_ids < 0
    seg = rank.masked_fill(pad, -1).to(torch.int32)
    lo = lo.masked_fill(pad, S).to(torch.int32)
    hi = hi.masked_fill(pad, 0).to(torch.int32)
    return seg, lo, hi


class LastCallCache:
    """``fn`` of tensors (or None), remembering its result for the last arguments.

    Every layer of a model passes the same mask tensors, so a layout derived from them is computed
    once per forward, not once per layer. The arguments are held weakly and keyed with their version
    counters, so an in-place change is noticed; inference tensors have no version counter and are
    never cached.
    """

    def __init__(self, fn):
        self.fn = fn
        self._key: tuple = ()
        self._value = None
        functools.update_wrapper(self, fn)

    def _hit(self, tensors) -> bool:
        if len(self._key) != len(tensors):
            return False
        for entry, t in zip(self._key, tensors):
            if (entry is None) != (t is None):
                return False
            if t is not None and (entry[0]() is not t or entry[1] != t._version):
                return False
        return True

    def __call__(self, *tensors):
        if any(t is not None and t.is_inference() for t in tensors):
            return self.fn(*tensors)
        if not self._hit(tensors):
            self._value = self.fn(*tensors)
            self._key = tuple(None if t is None else (weakref.ref(t), t._version) for t in tensors)
        return self._value


_cached_segment_layout = LastCallCache(segment_layout)


def _kernel_segments(segment_ids, B, S, device):
    """(seg, lo, hi) for the kernels; None means one segment per row."""
    if segment_ids is None:
        seg = torch.zeros(B, S, dtype=torch.int32, device=device)
        lo = torch.zeros(B, S, dtype=torch.int32, device=device)
        hi = torch.full((B, S), S, dtype=torch.int32, device=device)
        return seg, lo, hi
    return _cached_segment_layout(segment_ids)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _grid_position(S, BLOCK: tl.constexpr):
        """(tile index along the sequence, flat batch*head index) of this program in a 1-D grid.

        The tile index varies fastest, so programs that run together share one head's K/V in L2;
        a 1-D grid also lifts CUDA's 65535 limit on the second grid axis (large B * H).
        """
        n_tiles = tl.cdiv(S, BLOCK)
        pid = tl.program_id(0)
        return pid % n_tiles, pid // n_tiles

    @triton.jit
    def _load_rows(base, offs_s, offs_d, stride_s, S, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows offs_s of one [S, HEAD_DIM] head (last dim contiguous): [len(offs_s), BLOCK_D], 0 outside."""
        ptrs = base + offs_s[:, None] * stride_s + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=offs_s[:, None] < S, other=0.0)
        else:
            return tl.load(ptrs, mask=(offs_s[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    @triton.jit
    def _store_rows(base, x, offs_s, offs_d, stride_s, S, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        ptrs = base + offs_s[:, None] * stride_s + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x, mask=offs_s[:, None] < S)
        else:
            tl.store(ptrs, x, mask=(offs_s[:, None] < S) & (offs_d[None, :] < HEAD_DIM))

    @triton.jit
    def _query_block(SEG, SPAN_LO, SPAN_HI, S, H, GROUP, BLOCK_M: tl.constexpr):
        """This program's BLOCK_M queries of one (batch, query head): their ids, segments, and the key
        range [kv_lo, kv_hi) they can see (from the first start to the last end of their segments)."""
        pid_m, pid_bh = _grid_position(S, BLOCK_M)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        in_rows = offs_m < S
        row = b.to(tl.int64) * S
        seg_q = tl.load(SEG + row + offs_m, mask=in_rows, other=-1)
        kv_lo = tl.min(tl.load(SPAN_LO + row + offs_m, mask=in_rows, other=S), axis=0)
        kv_hi = tl.max(tl.load(SPAN_HI + row + offs_m, mask=in_rows, other=0), axis=0)
        return pid_bh, b, h, h // GROUP, offs_m, in_rows, row, seg_q, kv_lo, kv_hi

    @triton.jit
    def _key_block_scores(
        q,
        seg_q,
        k_base,
        seg_row,
        offs_n,
        offs_d,
        stride_ks,
        S,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One key block: its keys, and the scaled base-2 scores of the query block against them,
        -inf where a query may not attend (another sample, or padding)."""
        k = _load_rows(k_base, offs_n, offs_d, stride_ks, S, HEAD_DIM, BLOCK_D)
        seg_k = tl.load(seg_row + offs_n, mask=offs_n < S, other=-1)
        allowed = (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] >= 0)
        return k, tl.where(allowed, dot(q, tl.trans(k), None, UPCAST_DOT) * qk_scale, float("-inf"))

    @triton.jit
    def _attn_fwd(
        Q,
        K,
        V,
        SEG,
        SPAN_LO,
        SPAN_HI,
        OUT,
        LSE,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_ob,
        stride_oh,
        stride_os,
        S,
        H,
        GROUP,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STORE_LSE: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one (batch, query head); cdiv(S, BLOCK_M) * B * H programs.

        qk_scale = softmax scale * log2(e): the softmax runs in base 2 (exp2 is the native unit).
        LSE (float32 [B, H, S], base 2, only if STORE_LSE) is +inf for a query with no key (padding),
        so that exp2(score - LSE) = 0 in the backward pass.
        """
        pid_bh, b, h, hk, offs_m, in_rows, row, seg_q, kv_lo, kv_hi = _query_block(
            SEG, SPAN_LO, SPAN_HI, S, H, GROUP, BLOCK_M
        )
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        q = _load_rows(
            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d, stride_qs, S, HEAD_DIM, BLOCK_D
        )
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

        # A finite floor instead of -inf: a row that sees no key in a block (its segment is elsewhere)
        # then gets alpha = exp2(0) = 1 and p = exp2(-inf) = 0 instead of NaN from (-inf) - (-inf).
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k, s = _key_block_scores(
                q, seg_q, k_base, SEG + row, offs_n, offs_d, stride_ks, S, qk_scale, HEAD_DIM, BLOCK_D, UPCAST_DOT
            )
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_rows(v_base, offs_n, offs_d, stride_vs, S, HEAD_DIM, BLOCK_D)
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
            m_i = m_new

        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]
        _store_rows(
            OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
            out.to(OUT.dtype.element_ty),
            offs_m,
            offs_d,
            stride_os,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        if STORE_LSE:
            lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
            tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=in_rows)

    @triton.jit
    def _attn_bwd_delta(
        OUT,
        DO,
        DELTA,
        stride_ob,
        stride_oh,
        stride_os,
        stride_dob,
        stride_doh,
        stride_dos,
        S,
        H,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """DELTA[b, h, i] = sum_d OUT * DO (float32 [B, H, S]): the softmax-backward row term."""
        pid_m, pid_bh = _grid_position(S, BLOCK_M)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_rows(
            OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
            offs_m,
            offs_d,
            stride_os,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        do = _load_rows(
            DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
            offs_m,
            offs_d,
            stride_dos,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)

    # The backward pass is split in two kernels so that every output has exactly one writer:
    # _attn_bwd_dkdv owns a block of keys (and sums over all query heads of its KV group),
    # _attn_bwd_dq owns a block of queries. The alternative, one kernel with atomic float32 adds
    # into dq, needs an extra float32 buffer and a cast, contends on the atomics, and makes dq
    # depend on the order in which programs finish (not bitwise reproducible). The price of the
    # split is recomputing Q K^T and dO V^T in the dq kernel: 7 block matmuls instead of 5.

    @triton.jit
    def _attn_bwd_dkdv(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        SEG,
        SPAN_LO,
        SPAN_HI,
        DK,
        DV,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_dob,
        stride_doh,
        stride_dos,
        stride_dkb,
        stride_dkh,
        stride_dks,
        S,
        H,
        GROUP,
        qk_scale,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One program: BLOCK_N keys of one (batch, KV head); cdiv(S, BLOCK_N) * B * H/GROUP programs.

        Works on the transposed scores (keys x queries), so that P^T and dS^T come out of the
        matmuls directly. DK and DV share one layout (both are fresh contiguous tensors).
        """
        pid_n, pid_bh = _grid_position(S, BLOCK_N)
        n_kv_heads = H // GROUP
        b = pid_bh // n_kv_heads
        hk = pid_bh % n_kv_heads
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_keys = offs_n < S

        row = b.to(tl.int64) * S
        seg_k = tl.load(SEG + row + offs_n, mask=in_keys, other=-1)
        q_lo = tl.min(tl.load(SPAN_LO + row + offs_n, mask=in_keys, other=S), axis=0)
        q_hi = tl.max(tl.load(SPAN_HI + row + offs_n, mask=in_keys, other=0), axis=0)

        k = _load_rows(
            K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh,
            offs_n,
            offs_d,
            stride_ks,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        v = _load_rows(
            V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh,
            offs_n,
            offs_d,
            stride_vs,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
            stat_base = (b * H + h).to(tl.int64) * S
            for start_m in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                in_rows = offs_m < S
                q = _load_rows(q_base, offs_m, offs_d, stride_qs, S, HEAD_DIM, BLOCK_D)
                seg_q = tl.load(SEG + row + offs_m, mask=in_rows, other=-1)
                lse = tl.load(LSE + stat_base + offs_m, mask=in_rows, other=float("inf"))
                qk_t = dot(k, tl.trans(q), None, UPCAST_DOT)
                allowed = (seg_k[:, None] == seg_q[None, :]) & (seg_k[:, None] >= 0)
                p_t = tl.math.exp2(tl.where(allowed, qk_t * qk_scale, float("-inf")) - lse[None, :])
                do = _load_rows(do_base, offs_m, offs_d, stride_dos, S, HEAD_DIM, BLOCK_D)
                dv = dot(p_t.to(do.dtype), do, dv, UPCAST_DOT)
                delta = tl.load(DELTA + stat_base + offs_m, mask=in_rows, other=0.0)
                dp_t = dot(v, tl.trans(do), None, UPCAST_DOT)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = dot(ds_t.to(q.dtype), q, dk, UPCAST_DOT)

        out_base = b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
        _store_rows(
            DK + out_base, (dk * scale).to(DK.dtype.element_ty), offs_n, offs_d, stride_dks, S, HEAD_DIM, BLOCK_D
        )
        _store_rows(DV + out_base, dv.to(DV.dtype.element_ty), offs_n, offs_d, stride_dks, S, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _attn_bwd_dq(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        SEG,
        SPAN_LO,
        SPAN_HI,
        DQ,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_dob,
        stride_doh,
        stride_dos,
        stride_dqb,
        stride_dqh,
        stride_dqs,
        S,
        H,
        GROUP,
        qk_scale,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one (batch, query head); cdiv(S, BLOCK_M) * B * H programs."""
        pid_bh, b, h, hk, offs_m, in_rows, row, seg_q, kv_lo, kv_hi = _query_block(
            SEG, SPAN_LO, SPAN_HI, S, H, GROUP, BLOCK_M
        )
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        stat_base = pid_bh.to(tl.int64) * S
        lse = tl.load(LSE + stat_base + offs_m, mask=in_rows, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=in_rows, other=0.0)

        q = _load_rows(
            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d, stride_qs, S, HEAD_DIM, BLOCK_D
        )
        do = _load_rows(
            DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
            offs_m,
            offs_d,
            stride_dos,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k, s = _key_block_scores(
                q, seg_q, k_base, SEG + row, offs_n, offs_d, stride_ks, S, qk_scale, HEAD_DIM, BLOCK_D, UPCAST_DOT
            )
            p = tl.math.exp2(s - lse[:, None])
            v = _load_rows(v_base, offs_n, offs_d, stride_vs, S, HEAD_DIM, BLOCK_D)
            dp = dot(do, tl.trans(v), None, UPCAST_DOT)
            ds = p * (dp - delta[:, None])
            dq = dot(ds.to(k.dtype), k, dq, UPCAST_DOT)

        _store_rows(
            DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh,
            (dq * scale).to(DQ.dtype.element_ty),
            offs_m,
            offs_d,
            stride_dqs,
            S,
            HEAD_DIM,
            BLOCK_D,
        )


# --------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. block_m: queries per tile, block_n: keys per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    fwd: KernelConfig
    delta: KernelConfig  # block_n unused
    dkdv: KernelConfig
    dq: KernelConfig


# Hopper (sm_90), float16/bfloat16, keyed by the padded head dim. Chosen with the ptxas report of
# `aot_specs()` (0 spill bytes, shared memory under 227 KB, and some register headroom: configs at
# the 255-register cap were passed over); tests/test_aot.py checks every one of them.
_SM90_CONFIGS = {
    64: AttentionConfig(
        fwd=KernelConfig(128, 64, 8, 3),
        delta=KernelConfig(128, 0, 4, 1),
        dkdv=KernelConfig(64, 128, 8, 3),
        dq=KernelConfig(128, 64, 8, 3),
    ),
    128: AttentionConfig(
        fwd=KernelConfig(128, 64, 8, 3),
        delta=KernelConfig(64, 0, 4, 1),
        dkdv=KernelConfig(32, 128, 8, 3),
        dq=KernelConfig(128, 64, 8, 2),
    ),
}
# Other GPUs: smaller tiles and two stages, which fit the ~100 KB of shared memory
# of consumer parts. Correct everywhere, tuned nowhere.
_GENERIC_CONFIG = AttentionConfig(
    fwd=KernelConfig(64, 32, 4, 2),
    delta=KernelConfig(64, 0, 4, 1),
    dkdv=KernelConfig(32, 64, 4, 2),
    dq=KernelConfig(64, 32, 4, 2),
)
# The interpreter runs one program at a time, so fewer, larger tiles are faster; query and key
# tiles differ so that the tests cover unequal block sizes.
_INTERPRETER_CONFIG = AttentionConfig(
    fwd=KernelConfig(32, 16, 4, 1),
    delta=KernelConfig(32, 0, 4, 1),
    dkdv=KernelConfig(16, 32, 4, 1),
    dq=KernelConfig(32, 16, 4, 1),
)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def attention_config(head_dim: int, device: torch.device) -> AttentionConfig:
    """The tiles the Triton path uses for this head dim on this device (float16/bfloat16 on a GPU)."""
    if interpreting() or device.type != "cuda":
        return _INTERPRETER_CONFIG
    major, _ = torch.cuda.get_device_capability(device)
    return sm90_config(head_dim) if major == 9 else _GENERIC_CONFIG


def sm90_config(head_dim: int) -> AttentionConfig:
    """The Hopper tiles for this head dim (16 and 32 use the 64 tiles)."""
    return _SM90_CONFIGS[max(_block_d(head_dim), 64)]


# --------------------------------------------------------------------------------------------------
# Launchers and the autograd Function
# --------------------------------------------------------------------------------------------------


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_forward(q, k, v, seg, lo, hi, scale, store_lse, config=None):
    """Launch _attn_fwd. Returns (out [B, Hq, S, D] in q's dtype, lse float32 [B, Hq, S] or None).

    ``out`` is a [B, Hq, S, D] view of a contiguous [B, S, Hq, D] buffer: the layout the model's
    output projection reads, so that ``out.transpose(1, 2)`` needs no copy.
    """
    B, H, S, D = q.shape
    cfg = (config or attention_config(D, q.device)).fwd
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device) if store_lse else None
    grid = (triton.cdiv(S, cfg.block_m) * B * H,)
    with on_device(q):
        _launch_fwd(grid, q, k, v, seg, lo, hi, out, lse, scale, cfg)
    return out, lse


def _launch_fwd(grid, q, k, v, seg, lo, hi, out, lse, scale, cfg):
    B, H, S, D = q.shape
    store_lse = lse is not None
    _attn_fwd[grid](
        q,
        k,
        v,
        seg,
        lo,
        hi,
        out,
        lse if store_lse else out.new_empty(0, dtype=torch.float32),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        S,
        H,
        H // k.shape[1],
        scale * _LOG2E,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        STORE_LSE=store_lse,
        UPCAST_DOT=upcast_dots(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _flash_backward(do, q, k, v, out, lse, seg, lo, hi, scale, config=None, need_dq=True, need_dkdv=True):
    """Launch the backward kernels: delta, then dK/dV and dQ (each only if needed).

    Returns dq, dk, dv in the inputs' dtypes and memory layouts (a transposed [B, S, H, D] input gets
    a gradient in that layout, so the projection's backward reads it without a copy), None where not
    needed.
    """
    with on_device(q):
        return _launch_backward(do, q, k, v, out, lse, seg, lo, hi, scale, config, need_dq, need_dkdv)


def _launch_backward(do, q, k, v, out, lse, seg, lo, hi, scale, config, need_dq, need_dkdv):
    B, H, S, D = q.shape
    cfgs = config or attention_config(D, q.device)

    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    c = cfgs.delta
    _attn_bwd_delta[(triton.cdiv(S, c.block_m) * B * H,)](
        out,
        do,
        delta,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        S,
        H,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=c.block_m,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )

    dq = dk = dv = None
    if need_dkdv:
        dk, dv = _launch_dkdv(q, k, v, do, lse, delta, seg, lo, hi, scale, cfgs.dkdv)
    if need_dq:
        dq = _launch_dq(q, k, v, do, lse, delta, seg, lo, hi, scale, cfgs.dq)
    return dq, dk, dv


def _launch_dkdv(q, k, v, do, lse, delta, seg, lo, hi, scale, c):
    B, H, S, D = q.shape
    group = H // k.shape[1]
    dk = torch.empty_like(k)
    dv = torch.empty_like(dk)  # the kernel writes both with dk's strides
    _attn_bwd_dkdv[(triton.cdiv(S, c.block_n) * B * (H // group),)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        seg,
        lo,
        hi,
        dk,
        dv,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        S,
        H,
        group,
        scale * _LOG2E,
        scale,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        UPCAST_DOT=upcast_dots(q.dtype),
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return dk, dv


def _launch_dq(q, k, v, do, lse, delta, seg, lo, hi, scale, c):
    B, H, S, D = q.shape
    dq = torch.empty_like(q)
    _attn_bwd_dq[(triton.cdiv(S, c.block_m) * B * H,)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        seg,
        lo,
        hi,
        dq,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        S,
        H,
        H // k.shape[1],
        scale * _LOG2E,
        scale,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        UPCAST_DOT=upcast_dots(q.dtype),
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return dq


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels. Saves q, k, v, out, the LSE and the segment arrays."""

    @staticmethod
    def forward(ctx, q, k, v, seg, lo, hi, scale, config):
        out, lse = _flash_forward(q, k, v, seg, lo, hi, scale, store_lse=True, config=config)
        ctx.save_for_backward(q, k, v, out, lse, seg, lo, hi)
        ctx.scale = scale
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, seg, lo, hi = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _flash_backward(
            do, q, k, v, out, lse, seg, lo, hi, ctx.scale, ctx.config, need_dq=need_q, need_dkdv=need_k or need_v
        )
        return dq, dk, dv, None, None, None, None, None


def attention_triton(q, k, v, segment_ids=None, scale=None, config: AttentionConfig | None = None):
    """The Triton path (CUDA, or CPU under TRITON_INTERPRET=1). Same shapes as :func:`attention_torch`.

    Without a gradient to compute (``torch.is_grad_enabled()`` false, or no input requiring grad)
    it runs the forward kernel alone: no LSE is stored and no autograd graph is built.
    ``config`` overrides the tile sizes (tests use it to cover other tilings).
    """
    if q.dim() == 4 and q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(
            f"bidirectional_attention: head dim {q.shape[-1]} exceeds {MAX_TRITON_HEAD_DIM}, the largest the "
            "Triton kernels support; use impl='torch'"
        )
    supported = (torch.float16, torch.bfloat16) + (() if cuda_rules(q) else (torch.float32,))
    if q.dtype not in supported:
        raise ValueError(
            f"bidirectional_attention: impl='triton' on {'cuda' if cuda_rules(q) else q.device.type} supports "
            f"{[str(d) for d in supported]}, q is {q.dtype}; use impl='torch'"
        )
    B, H, S, D = q.shape
    scale = _default_scale(scale, D)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.numel() == 0:
        out = q.new_zeros(q.shape)
        return out + 0 * (q.sum() + k.sum() + v.sum()) if needs_grad else out
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    seg, lo, hi = _kernel_segments(segment_ids, B, S, q.device)
    if needs_grad:
        return FlashAttentionFunction.apply(q, k, v, seg, lo, hi, scale, config)
    return _flash_forward(q, k, v, seg, lo, hi, scale, store_lse=False, config=config)[0]


@functools.cache
def _warn_fallback_once(reason: str) -> None:
    logger.warning("bidirectional_attention: impl='auto' runs the torch path (SDPA): %s", reason)


def bidirectional_attention(q, k, v, segment_ids=None, scale=None, impl="auto"):
    """Non-causal attention over packed rows.

    q [B, Hq, S, D]; k, v [B, Hkv, S, D] with Hq % Hkv == 0 (grouped-query attention: query head h
    uses KV head h // (Hq // Hkv)); segment_ids int [B, S] or None (see the module docstring);
    scale: softmax scale, default 1/sqrt(D). impl: "auto" (Triton for float16/bfloat16 CUDA tensors
    with head dim <= 128, else "torch"; a head dim above 128 is logged once), "triton", "torch"
    (SDPA with the block-diagonal mask) or "eager" (matmul / softmax, for comparisons).

    Returns [B, Hq, S, D] in q's dtype. The Triton path returns it as a view of a contiguous
    [B, S, Hq, D] buffer (``out.transpose(1, 2)`` is contiguous), the layout a transformer's output
    projection reads.
    """
    _check_inputs(q, k, v, segment_ids, scale)
    requested = impl
    impl = resolve_impl(impl, q, "bidirectional_attention", _IMPLS)
    if requested == "auto" and impl == "triton":
        if q.dtype not in (torch.float16, torch.bfloat16):
            impl = "torch"  # float32 on CUDA: by design (see the module docstring)
        elif q.shape[-1] > MAX_TRITON_HEAD_DIM:
            _warn_fallback_once(
                f"head dim {q.shape[-1]} exceeds {MAX_TRITON_HEAD_DIM}, the largest the Triton kernels support"
            )
            impl = "torch"
    if impl == "triton":
        return attention_triton(q, k, v, segment_ids, scale)
    if impl == "eager":
        return attention_eager(q, k, v, segment_ids, scale)
    return attention_torch(q, k, v, segment_ids, scale)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m tools.aot_report)
# --------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _bshd_strides(prefix, n_heads, seq_len, head_dim):
    """Strides of a [B, heads, S, D] view of a contiguous [B, S, heads, D] tensor, as transformers passes
    q/k/v (and as the forward writes its output), named like the kernels' stride arguments."""
    return {
        f"stride_{prefix}b": seq_len * n_heads * head_dim,
        f"stride_{prefix}h": head_dim,
        f"stride_{prefix}s": n_heads * head_dim,
    }


def aot_specs(seq_len=4096, n_heads=32, n_kv_heads=32):
    """Every kernel configuration the Triton path launches on an H100 (sm_90), for AOT inspection.

    For head dims 64 and 128, float16 and bfloat16: the forward kernel with and without the LSE
    (training / reference model), then the delta, dK/dV and dQ kernels of the backward pass.

    Each entry: name, fn (the @triton.jit function), signature (arg -> triton type), constexprs
    (arg -> value), attrs (the 16-divisibility hints the JIT attaches for 16-byte-aligned contiguous
    tensors of this shape; pass them to ASTSource to compile exactly what runs), num_warps,
    num_stages. Scalars are specialised as Triton's JIT specialises the call a transformers model
    makes (q/k/v as [B, heads, seq_len, D] views of [B, seq_len, heads, D]), so that GROUP = 1 (no GQA, as in LLaDA
    8B) becomes a constexpr as
    it does at run time. Compile in a process without TRITON_INTERPRET (the interpreter replaces
    @triton.jit functions), and read registers and spills with triton's own sm_90 ptxas
    (``triton.backends.nvidia.compiler.get_ptxas(90)``: the PTX that triton 3.9 emits is version
    9.x, which the older ``bin/ptxas`` (CUDA 12.9) rejects).
    """
    if triton is None:  # pragma: no cover
        return []
    specs = []
    group = n_heads // n_kv_heads
    for head_dim, dtype in itertools.product((64, 128), (torch.float16, torch.bfloat16)):
        cfgs = _SM90_CONFIGS[head_dim]
        ty = _TRITON_DTYPES[dtype]
        tag = f"d{head_dim}_{ty}"
        q_layout = functools.partial(_bshd_strides, n_heads=n_heads, seq_len=seq_len, head_dim=head_dim)
        kv_layout = functools.partial(_bshd_strides, n_heads=n_kv_heads, seq_len=seq_len, head_dim=head_dim)
        tiles = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "UPCAST_DOT": False}
        sizes = {"S": seq_len, "H": n_heads}

        c = cfgs.fwd
        fwd_ptrs = {
            "Q": ty,
            "K": ty,
            "V": ty,
            "OUT": ty,
            "SEG": "i32",
            "SPAN_LO": "i32",
            "SPAN_HI": "i32",
            "LSE": "fp32",
        }
        fwd_scalars = {
            **q_layout("q"),
            **kv_layout("k"),
            **kv_layout("v"),
            **q_layout("o"),
            **sizes,
            "GROUP": group,
            "qk_scale": 1.0,
        }
        for store_lse in (True, False):
            specs.append(
                aot_spec(
                    f"attn_fwd_{'lse' if store_lse else 'nolse'}_{tag}",
                    _attn_fwd,
                    fwd_ptrs,
                    fwd_scalars,
                    {**tiles, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "STORE_LSE": store_lse},
                    c.num_warps,
                    c.num_stages,
                )
            )

        c = cfgs.delta
        delta_tiles = {k: v for k, v in tiles.items() if k != "UPCAST_DOT"}
        specs.append(
            aot_spec(
                f"attn_bwd_delta_{tag}",
                _attn_bwd_delta,
                {"OUT": ty, "DO": ty, "DELTA": "fp32"},
                {**q_layout("o"), **q_layout("do"), **sizes},
                {**delta_tiles, "BLOCK_M": c.block_m},
                c.num_warps,
                c.num_stages,
            )
        )

        # The gradients come back in the inputs' layouts (empty_like), dO in the output's.
        bwd_ptrs = {
            "Q": ty,
            "K": ty,
            "V": ty,
            "DO": ty,
            "LSE": "fp32",
            "DELTA": "fp32",
            "SEG": "i32",
            "SPAN_LO": "i32",
            "SPAN_HI": "i32",
            "DK": ty,
            "DV": ty,
            "DQ": ty,
        }
        bwd_scalars = {
            **q_layout("q"),
            **kv_layout("k"),
            **kv_layout("v"),
            **q_layout("do"),
            **kv_layout("dk"),
            **q_layout("dq"),
            **sizes,
            "GROUP": group,
            "qk_scale": 1.0,
            "scale": 1.0,
        }
        for kname, fn, c in (("dkdv", _attn_bwd_dkdv, cfgs.dkdv), ("dq", _attn_bwd_dq, cfgs.dq)):
            specs.append(
                aot_spec(
                    f"attn_bwd_{kname}_{tag}",
                    fn,
                    bwd_ptrs,
                    bwd_scalars,
                    {**tiles, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                    c.num_warps,
                    c.num_stages,
                )
            )
    return specs
