"""The chunked PyTorch path of :func:`vrpo_kernels.masked_linear_ce` (``impl="torch"``, the CPU path).

The forward streams vocabulary chunks with an online log-sum-exp; the backward either reuses the kept
softmax numerators (when they fit ``max_buffer_bytes``) or recomputes them chunk by chunk. The design
and its measurements are in docs/masked_linear_ce.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .common import DEFAULT_MAX_BUFFER_BYTES
from .common import FLOOR as _FLOOR

logger = logging.getLogger(__name__)

# Elements of one [vocab, rows] chunk: 16M fp32 = 64 MB when recomputed (within the budget), 32M when
# kept (the kept chunks add up to the same buffer whatever their size). Every parallel op on a chunk ends
# in a thread barrier, which stalls whenever another process holds a core, so few large chunks beat many
# small ones: measured interleaved on a loaded 2-core x86 CPU at n = 1024, H = 256, V = 126,464,
# forward + backward took 1.6x as long with 2M-element chunks as with 8M, 8M took 1.15x as long as 16M,
# and 32M was no faster than 16M when recomputing.
_CHUNK_ELEMS = 1 << 24
_KEPT_CHUNK_ELEMS = 1 << 25
# Logits are scaled by log2(e) inside the GEMM so that the chunk passes use exp2, which torch
# vectorises at several times the speed of exp (same 1-ulp accuracy class).
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_CHUNK_ROWS = 2048


def _chunks(n: int, vocab: int, max_buffer_bytes: int, all_rows: bool = False) -> tuple[int, int]:
    """(rows, vocab) per chunk: at most ``max_buffer_bytes`` and _CHUNK_ELEMS fp32 elements, rows up to
    _MAX_CHUNK_ROWS (all ``n`` with ``all_rows``, the kept path), vocab a multiple of 256 (at least 256)."""
    elems = max(256, min(_KEPT_CHUNK_ELEMS if all_rows else _CHUNK_ELEMS, max_buffer_bytes // 4))
    rows = max(1, n if all_rows else min(n, _MAX_CHUNK_ROWS, elems // 256))
    cols = max(256, (elems // rows) // 256 * 256)
    return rows, min(cols, vocab)


def _keeps_logits(n: int, vocab: int, max_buffer_bytes: int) -> bool:
    """True when the selected rows' fp32 softmax numerators [V, n] fit in the budget (three GEMMs)."""
    return n * vocab * 4 <= max_buffer_bytes


# The chunk GEMMs are most of the cost of this path. On x86 CPUs two fp32 GEMMs are at hand: oneDNN's
# (what torch.compile uses for packed linears; it reads transposed operands in place and adds a
# per-column bias in the same pass), reached through a private op, and torch.mm (MKL or OpenBLAS).
# The two round differently, so the choice is fixed, never timed: a timed probe made two contending runs
# of one command pick different GEMMs and write different bytes. oneDNN is used wherever it works;
# VRPO_CPU_GEMM=mm pins torch.mm (measured faster on some AVX2 CPUs: benchmarks/README.md).
_CPU_GEMM: str | None = None


def _onednn_linear(x, w, bias):
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _onednn_linear_add(x, w, acc):
    return torch.ops.mkldnn._linear_pointwise.binary(x, acc, w, None, "add")


def _onednn_agrees() -> bool:
    """oneDNN's GEMM against torch.addmm on every operand layout this path uses."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(37, 19, generator=g), torch.randn(23, 19, generator=g), torch.randn(23, generator=g)
    a_t, b_t = torch.randn(19, 37, generator=g).T, torch.randn(19, 23, generator=g).T
    acc = torch.randn(37, 23, generator=g)
    return all(
        torch.allclose(_onednn_linear(x, w, bias), x @ w.T + (0 if bias is None else bias), rtol=1e-5, atol=1e-5)
        for x, w, bias in ((a, b, None), (a_t, b, None), (a, b_t, c), (a_t, b_t, c))
    ) and torch.allclose(_onednn_linear_add(a_t, b_t, acc), acc + a_t @ b_t.T, rtol=1e-5, atol=1e-5)


def _choose_cpu_gemm() -> str:
    """ "onednn" where oneDNN's fp32 GEMM works and agrees with torch.mm, else "mm" (logged at WARNING);
    ``VRPO_CPU_GEMM=mm`` pins torch.mm."""
    forced = os.environ.get("VRPO_CPU_GEMM", "")
    if forced not in ("", "mm", "mkl", "onednn"):
        raise ValueError(f"VRPO_CPU_GEMM={forced!r}: use 'onednn' or 'mm' (or leave it unset for oneDNN)")
    if forced in ("mm", "mkl"):
        return "mm"
    try:
        ok = _onednn_agrees()
    except Exception as exc:  # no oneDNN in this torch build, or the private op changed
        logger.warning(
            "masked_linear_ce: oneDNN's fp32 GEMM is unavailable (%s: %s); using torch.mm on the CPU",
            type(exc).__name__,
            exc,
        )
        return "mm"
    if not ok:
        logger.warning("masked_linear_ce: oneDNN's fp32 GEMM disagrees with torch.mm; using torch.mm on the CPU")
        return "mm"
    return "onednn"


def _cpu_gemm() -> str:
    """The CPU fp32 GEMM of this process ("onednn" or "mm"), chosen on first use and cached."""
    global _CPU_GEMM
    if _CPU_GEMM is None:
        _CPU_GEMM = _choose_cpu_gemm()
    return _CPU_GEMM


def _use_onednn(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _cpu_gemm() == "onednn"


def _linear_add(x: torch.Tensor, w: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``acc + x @ w.T`` as a new tensor, the addition fused into the GEMM."""
    if _use_onednn(x):
        return _onednn_linear_add(x, w, acc)
    return torch.addmm(acc, x, w.T)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out=None) -> torch.Tensor:
    """``x @ w.T (+ bias)``, bias per output column, into ``out`` when given: fp32 matrices, transposed
    views welcome."""
    if _use_onednn(x):
        y = _onednn_linear(x, w, bias)
        return y if out is None else out.copy_(y)
    if bias is None:
        return torch.mm(x, w.T, out=out) if out is not None else x @ w.T
    return torch.addmm(bias, x, w.T, out=out) if out is not None else torch.addmm(bias, x, w.T)


class _WeightChunks:
    """fp32 chunks of the head weight (and bias): low-precision weights are upcast one chunk at a time,
    into one reused buffer, so that the GEMMs accumulate in fp32 without an fp32 copy of the head."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cols: int, scale: float = 1.0):
        self.weight, self.bias, self.scale = weight, bias, scale
        self.buf = None
        if weight.dtype != torch.float32:
            self.buf = torch.empty(cols * weight.shape[1], dtype=torch.float32, device=weight.device)

    def __call__(self, v0: int, v1: int):
        w = self.weight[v0:v1]
        if self.buf is not None:
            w = self.buf[: w.numel()].view(w.shape).copy_(w)
        b = self.bias[v0:v1].float() * self.scale if self.bias is not None else None
        return w, b


def _shifted_logits_t(w, b, h, shift):
    """fp32 [vocab, rows]: ``h @ w.T + b`` transposed, minus a per-row ``shift`` (or None). The callers
    pass ``h`` and ``b`` pre-scaled by log2(e), so these are base-2 logits."""
    zt = _linear(w, h, None if shift is None else -shift)  # the shift is a per-column bias of z^T
    if b is not None:
        zt.add_(b[:, None])
    return zt


def _target_logits(h32: torch.Tensor, weight, bias, targets) -> torch.Tensor:
    """fp32 [n]: the logit of each row's target, a dot product per row (no vocabulary sweep)."""
    z = torch.einsum("nh,nh->n", h32, weight[targets].float())
    if bias is not None:
        z = z + bias[targets].float()
    return z


def _chunk_exp2(w, b, h2, running):
    """One vocabulary chunk of the forward: ``(e, shift, lse2)`` with ``e = 2^(z2 - shift)`` fp32
    [vocab, rows] for the chunk's base-2 logits ``z2``, and ``lse2`` its base-2 log-sum-exp per row.
    ``shift`` is ``running`` (the log-sum-exp of the chunks so far, None for the first chunk), which keeps
    every exp2 <= 2^127 unless this chunk holds a logit that far above everything seen so far; only then
    (a non-finite sum) is the chunk recomputed and shifted by its own row max."""
    if running is not None:
        e = _shifted_logits_t(w, b, h2, running).exp2_()
        s = e.sum(dim=0)
        if bool(torch.isfinite(s).all()):
            return e, running, running + s.log2()
    zt = _shifted_logits_t(w, b, h2, None)
    top = zt.amax(dim=0).clamp_min_(_FLOOR)
    e = zt.sub_(top).exp2_()
    return e, top, top + e.sum(dim=0).log2()


@dataclass
class _Kept:
    """The forward's softmax numerators, kept for the backward when they fit the budget: per vocabulary
    chunk ``k`` (all rows), ``chunks[k] = 2^(z2 - shifts[k])`` fp32 [vocab_k, n], so that the softmax
    (transposed) is ``chunks[k] * 2^(shifts[k] - lse2)``."""

    chunks: list[torch.Tensor]
    shifts: list[torch.Tensor]


def linear_ce_torch_forward(
    h: torch.Tensor, weight, bias, targets, max_buffer_bytes=DEFAULT_MAX_BUFFER_BYTES, keep: bool = False
):
    """Streamed forward on gathered rows: an online log-sum-exp over vocabulary chunks. h [n, H] (any
    float dtype), weight [V, H], bias [V] or None, targets int64 [n]. Returns ``(logp, lse, kept)``: fp32
    [n] twice, and a :class:`_Kept` when ``keep`` and the logits fit in ``max_buffer_bytes`` (else None)."""
    n, V = h.shape[0], weight.shape[0]
    h32 = h.float()
    lse2 = torch.empty(n, dtype=torch.float32, device=h.device)
    keep = keep and n > 0 and _keeps_logits(n, V, max_buffer_bytes)
    rows, cols = _chunks(n, V, max_buffer_bytes, all_rows=keep)
    kept = _Kept([], []) if keep else None
    chunk = _WeightChunks(weight, bias, cols, scale=_LOG2E)
    h2 = h32 * _LOG2E
    for r0 in range(0, n, rows):
        running = None
        for v0 in range(0, V, cols):
            e, shift, part = _chunk_exp2(*chunk(v0, min(V, v0 + cols)), h2[r0 : r0 + rows], running)
            running = part if running is None else torch.logaddexp2(running, part)
            if keep:
                kept.chunks.append(e)
                kept.shifts.append(shift)
        lse2[r0 : r0 + rows] = running
    lse = lse2 * _LN2
    return _target_logits(h32, weight, bias, targets) - lse, lse, kept


def _accumulate(out: torch.Tensor, part: torch.Tensor, first: bool):
    if first:
        out.copy_(part)
    else:
        out.add_(part)


@dataclass
class _Grads:
    """fp32 gradient accumulators of the torch path (None where not needed): ``dh_t`` [H, rows] of the
    current row chunk, ``dw`` [V, H], ``db`` [V]."""

    dh_t: torch.Tensor | None
    dw: torch.Tensor | None
    db: torch.Tensor | None


def _chunk_grads(e, w, neg_gs, hr, grads: _Grads, v0: int, first_rows: bool, first_vocab: bool):
    """Add one chunk's softmax part: with ``e`` [vocab, rows] and ``neg_gs`` [rows] such that
    ``-g * softmax^T = e * neg_gs``: ``d_W[chunk] += e @ (neg_gs h)``, ``d_b[chunk] += e @ neg_gs``,
    ``d_h^T += (W[chunk]^T @ e) * neg_gs``. The products keep ``e`` as it lies in memory."""
    v1 = v0 + e.shape[0]
    if grads.dw is not None:
        _accumulate(grads.dw[v0:v1], _linear(e, (hr * neg_gs[:, None]).T.contiguous()), first_rows)
    if grads.db is not None:
        _accumulate(grads.db[v0:v1], torch.mv(e, neg_gs), first_rows)
    if grads.dh_t is not None:
        prod = _linear(w.T, e.T)  # [H, rows]
        if first_vocab:
            torch.mul(prod, neg_gs[None, :], out=grads.dh_t)
        else:
            grads.dh_t.addcmul_(prod, neg_gs[None, :])


def _add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``out[index[i]] += src[i]`` in a fixed order, duplicates included. On the CPU index_add_ adds the
    rows in index order, while index_put_(accumulate=True) adds atomically from several threads; on
    CUDA it is the other way round: index_add_ is atomic and index_put_(accumulate=True) sorts the
    indices and adds each one's rows in turn (PyTorch's list of nondeterministic operations)."""
    if out.is_cuda:
        out.index_put_((index,), src, accumulate=True)
    else:
        out.index_add_(0, index, src)


def _add_onehot(g, h32, weight, targets, dh, grads: _Grads):
    """The one-hot part of ``dz = g * (onehot - softmax)``: ``d_h += g W[y]``, ``d_W[y] += g h``,
    ``d_b[y] += g``, deterministically (:func:`_add_rows`)."""
    if dh is not None:
        dh.add_(weight[targets].float() * g[:, None])
    if grads.dw is not None:
        _add_rows(grads.dw, targets, h32 * g[:, None])
    if grads.db is not None:
        _add_rows(grads.db, targets, g)


def linear_ce_torch_backward(
    grad_logp,
    h,
    weight,
    bias,
    targets,
    lse,
    kept=None,
    needs=(True, True, True),
    max_buffer_bytes=DEFAULT_MAX_BUFFER_BYTES,
):
    """Gradients of ``sum(grad_logp * logp)`` for :func:`linear_ce_torch_forward`. Returns
    ``(d_h, d_weight, d_bias)`` in the inputs' dtypes (None where not needed).

    With ``P = softmax`` and ``g = grad_logp``: ``dz = g * (onehot - P)``, ``d_h = dz @ W``,
    ``d_W = dz^T @ h``, ``d_b = sum_rows(dz)``. The softmax chunks come from ``kept`` (two GEMMs per
    chunk; each chunk is released from ``kept`` once used) or are recomputed (three); the one-hot part
    is added at the end."""
    need_h, need_w, need_b = needs
    n, H = h.shape
    V = weight.shape[0]
    dev = h.device
    g, h32 = grad_logp.float(), h.float()
    lse2 = lse * _LOG2E
    dh = torch.empty(n, H, dtype=torch.float32, device=dev) if need_h else None
    # Every element of dw / db is written by the first row chunk, so they start empty (zeros if n == 0).
    alloc = torch.empty if n else torch.zeros
    grads = _Grads(None, alloc(V, H, device=dev) if need_w else None, alloc(V, device=dev) if need_b else None)
    rows, cols = _chunks(n, V, max_buffer_bytes, all_rows=kept is not None)
    chunk = _WeightChunks(weight, None if kept is not None else bias, cols, scale=_LOG2E)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        grads.dh_t = torch.empty(H, r1 - r0, device=dev) if need_h else None
        for k, v0 in enumerate(range(0, V, cols)):
            w, b = chunk(v0, min(V, v0 + cols))
            if kept is not None:
                e, neg_gs = kept.chunks[k], -g * torch.exp2(kept.shifts[k] - lse2)
            else:
                e, neg_gs = _shifted_logits_t(w, b, h32[r0:r1] * _LOG2E, lse2[r0:r1]).exp2_(), -g[r0:r1]
            _chunk_grads(e, w, neg_gs, h32[r0:r1], grads, v0, first_rows=r0 == 0, first_vocab=v0 == 0)
            if kept is not None:  # free each kept chunk once used: d_weight grows as the kept softmax shrinks
                kept.chunks[k] = e = None
        if need_h:
            dh[r0:r1] = grads.dh_t.T
    _add_onehot(g, h32, weight, targets, dh, grads)
    return (
        dh.to(h.dtype) if need_h else None,
        grads.dw.to(weight.dtype) if need_w else None,
        grads.db.to(bias.dtype) if need_b else None,
    )
