"""Masked linear cross-entropy: the LM head and the per-token ELBO term in one op.

For every selected row ``i``::

    out[i] = row_weight[i] * log_softmax(hidden[i] @ weight.T + bias)[targets[i]]

and ``out[i] = 0`` for rows that are not selected. Only the selected rows ever reach a matmul. At
LLaDA's vocabulary (V = 126,464) the logits of a few thousand rows are gigabytes, so the op bounds
the largest intermediate it holds by ``max_buffer_bytes`` (default :data:`DEFAULT_MAX_BUFFER_BYTES`,
1 GiB).

Three implementations behind one entry point, :func:`masked_linear_ce` (``impl=``):

* ``"eager"``: :func:`masked_linear_ce_eager`, full logits, the readable reference;
* ``"torch"``: chunked PyTorch (the CPU path, also correct on CUDA);
* ``"triton"``: a Triton forward and a GEMM-based backward with one fused Triton pass (CUDA);

both streamed ones through one autograd Function, :class:`_StreamedLinearCE`. Gradients flow to
``hidden``, ``weight``, ``bias`` (and ``row_weight``, applied outside the fused part). Under
``torch.no_grad()`` (the reference model) nothing is saved for backward.

**Triton path (CUDA).** Launches, for ``n`` selected rows, ``H`` hidden, ``V`` vocabulary:

* forward: ``_lse_forward_kernel``, grid (row blocks of BLOCK_M, vocabulary splits): logit tiles
  ``[BLOCK_M, BLOCK_V]`` accumulated in registers over ``H`` (``tl.dot``), an online max / rescaled
  sum per row, and the target logit; the splits' partials are merged by a few small PyTorch ops.
  Saved for backward: the log-sum-exp per row (fp32 ``[n]``), nothing ``[n, V]``.
* backward, per chunk of ``R`` rows (in order), into one reused fp32 buffer ``[R, V]``:

  1. ``logits = h[rows] @ W.T``: one cuBLAS GEMM, operands in the compute dtype, fp32 out
     (``torch.mm(..., out_dtype=torch.float32)``);
  2. ``_softmax_grad_kernel``, grid (R,): ``dz = g * (onehot - exp(logits + b - lse))`` in place,
     written in the compute dtype over the same storage (see the kernel for why that is safe);
  3. ``d_hidden[rows] = dz @ W``: one GEMM;
  4. ``d_weight (+)= dz.T @ h[rows]``: one GEMM (fp32 accumulator when there is more than one chunk);
  5. ``d_bias += dz.sum(0)`` (with a bias).

  ``R = max_buffer_bytes // (4 V)``: at the default budget and V = 126,464 that is 2,122 rows, so
  a typical VRPO micro-batch (a few thousand masked tokens) runs in one or two chunks.

Why this backward rather than a fused kernel with register-resident tiles over V (counts at n = 4096,
H = 4096, V = 126,464, bf16, H100: 989 TFLOP/s, 3.35 TB/s):

* here the three backward GEMMs are ``3 * 2nHV = 12.7 TFLOP`` (12.9 ms at peak; cuBLAS runs large
  GEMMs near it). The chunk adds ``nV * (4 + 4 + 2 + 2 + 2) = 14 nV`` bytes (fp32 logits written and
  read, dz written, dz read by each GEMM): 7.3 GB, 2.2 ms, and each extra chunk re-reads and re-writes
  the fp32 dW accumulator (``8VH`` = 4 GB, 1.2 ms; none with one chunk). At peak rates that is ~15 ms
  for the backward (two chunks at the default budget) against a floor of 12.9 ms.
* a fused dW kernel must hold a ``[BLOCK_V, H]`` fp32 accumulator per vocabulary tile while it sweeps
  the rows: 2 MB at BLOCK_V = 128, H = 4096, against ~228 KB of shared memory per SM. So it either
  tiles H as well and recomputes every logit tile ``H / BLOCK_H = 32`` times (32x the logits GEMM's
  4.2 TFLOP), or streams the accumulator through global memory at every K step (the old kernels: ~265
  GB for dW and ~133 GB for dH, ~120 ms); a deterministic two-stage reduction over row splits adds a
  ``[splits, V, H]`` fp32 partial buffer on top.

Every GEMM is one call and chunks run in order, so the gradients are bit-reproducible: no atomics.

**Precision.** The logits are fp32 (cuBLAS accumulates in fp32 and writes fp32), the softmax and
``dz`` are computed in fp32 and rounded once to the compute dtype, like the reference's ``dz`` tiles.
fp32 inputs: the forward kernel's ``tl.dot`` uses TF32 tensor cores (10-bit mantissa) and the
backward's cuBLAS GEMMs follow ``torch.backends.cuda.matmul``; ``impl="auto"`` sends fp32 to the Triton
path only when TF32 is allowed (``torch.set_float32_matmul_precision("high")``) and to the torch path
(IEEE fp32 cuBLAS GEMMs) otherwise. Under ``torch.autocast`` the Triton path runs in the autocast
dtype (the head weight is cast once per call, as autocast does for ``nn.Linear``).

**Torch path (CPU).** The forward streams vocabulary chunks (one GEMM each, then exp2 and a sum while
the chunk is in cache) with an online log-sum-exp. When the selected rows' softmax numerators fit in
``max_buffer_bytes`` (fp32 ``[V, n]``), it keeps each chunk's ``2^(logits - shift)`` and the backward
runs two GEMMs per chunk on it (for ``d_weight`` and ``d_hidden``): three GEMMs in all, as a compiled
eager implementation. Otherwise the chunks hold at most ``max_buffer_bytes`` and the backward
recomputes them (four GEMMs, memory independent of ``n``). The GEMM is oneDNN's or
``torch.mm``'s, chosen once per process by a timed probe (:func:`_cpu_gemm`). Deterministic for a
given thread count whatever the load: chunk sizes do not depend on threads, and the one-hot part of
``dz`` is added in a fixed order (``index_add_`` on the CPU, ``index_put_(accumulate=True)`` on CUDA,
where the torch path serves fp32 without TF32; each device's other op adds atomically).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from ._triton_utils import aot_spec, on_device, upcast_dots
from .dispatch import resolve_impl, triton_available

logger = logging.getLogger(__name__)

#: Default of ``masked_linear_ce(max_buffer_bytes=None)``: the largest intermediate the op may hold.
DEFAULT_MAX_BUFFER_BYTES = 1 << 30

# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def masked_linear_ce_eager(hidden, weight, targets, row_weight, row_mask, bias=None):
    """Reference: materialises the full logits [N, V] in fp32. float32 [N]; ``row_mask`` bool [N]."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None].long())[:, 0]
    return torch.where(row_mask, logp * row_weight.float(), torch.zeros_like(logp))


# --------------------------------------------------------------------------------------------------
# Chunked PyTorch path (the CPU path)
# --------------------------------------------------------------------------------------------------

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
# The running max starts here, not at -inf: a row whose first tile is all -inf (a -inf bias on padded
# vocabulary) would otherwise compute exp(-inf - -inf) = NaN. Every finite logit is >= this floor.
_FLOOR = -torch.finfo(torch.float32).max


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
# Which is faster depends on the CPU (measured: ~2x apart on some AMD cores, alike on others), so a
# short timed probe picks one, once per process. The two round differently, so results are
# bit-reproducible across runs only while the choice is stable: the probe keeps oneDNN unless torch.mm
# is clearly faster (best of 5 interleaved rounds, by _GEMM_MARGIN), so that a loaded machine's noise
# does not flip it; VRPO_CPU_GEMM=onednn|mm pins it.
_CPU_GEMM: str | None = None
_GEMM_MARGIN = 1.5


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


def _probe_cpu_gemm() -> str:
    """"onednn" or "mm": the faster fp32 GEMM on this CPU at a chunk's shape (best of 5, interleaved)."""
    forced = os.environ.get("VRPO_CPU_GEMM", "")
    if forced not in ("", "mm", "mkl", "onednn"):
        raise ValueError(f"VRPO_CPU_GEMM={forced!r}: use 'onednn' or 'mm' (or leave it unset for the timed probe)")
    if forced in ("mm", "mkl"):
        return "mm"
    try:
        ok = _onednn_agrees()
    except Exception as exc:  # no oneDNN in this torch build, or the private op changed
        logger.warning("masked_linear_ce: oneDNN's fp32 GEMM is unavailable (%s: %s); using torch.mm on the CPU",
                       type(exc).__name__, exc)
        return "mm"
    if not ok:
        logger.warning("masked_linear_ce: oneDNN's fp32 GEMM disagrees with torch.mm; using torch.mm on the CPU")
        return "mm"
    if forced == "onednn":
        return "onednn"
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4096, 256, generator=g), torch.randn(512, 256, generator=g)
    runs = {"onednn": lambda: _onednn_linear(x, w, None), "mm": lambda: x @ w.T}
    for fn in runs.values():
        fn()  # warm-up: oneDNN builds its kernel on the first call
    best = {name: float("inf") for name in runs}
    for _ in range(5):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return "mm" if best["mm"] * _GEMM_MARGIN < best["onednn"] else "onednn"


def _cpu_gemm() -> str:
    """The CPU fp32 GEMM of this process ("onednn" or "mm"), probed on first use and cached."""
    global _CPU_GEMM
    if _CPU_GEMM is None:
        _CPU_GEMM = _probe_cpu_gemm()
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


def linear_ce_torch_forward(h: torch.Tensor, weight, bias, targets, max_buffer_bytes=DEFAULT_MAX_BUFFER_BYTES,
                            keep: bool = False):
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


def linear_ce_torch_backward(grad_logp, h, weight, bias, targets, lse, kept=None, needs=(True, True, True),
                             max_buffer_bytes=DEFAULT_MAX_BUFFER_BYTES):
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


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_utils import dot

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_h, stride_w,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """fp32 [BLOCK_M, BLOCK_V] logits of rows x cols (masked rows/cols give garbage, not NaN)."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = dot(a, b, acc, UPCAST_DOT, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _lse_forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_max_ptr, part_sum_ptr, part_tgt_ptr,
                            n, V, K, stride_h, stride_w, tiles_per_split, floor,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """Per (row block, vocabulary split): running max, rescaled sum of exp, and target logit."""
        split = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        # A finite floor, not -inf: a tile whose logits are all -inf (padding columns, a -inf bias)
        # then adds exp(-inf - floor) = 0 instead of exp(-inf - -inf) = NaN.
        run_max = tl.zeros((BLOCK_M,), dtype=tl.float32) + floor
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        v_begin = split * tiles_per_split * BLOCK_V
        for t in range(tiles_per_split):
            cols = v_begin + t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_h, stride_w,
                            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
            tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        out = split * n + rows
        tl.store(part_max_ptr + out, run_max, mask=row_ok)
        tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
        tl.store(part_tgt_ptr + out, tgt_logit, mask=row_ok)

    @triton.jit
    def _softmax_grad_kernel(z_ptr, dz_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, V, stride_z, stride_dz,
                             HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row per program: ``dz = g * (onehot - exp(z + b - lse))`` over its V logits, left to right.

        ``dz`` may be ``z``'s own storage viewed in a 16-bit dtype (same row start, row stride 2V): the
        store of tile [v0, v0 + BLOCK_V) then overwrites the bytes of fp32 logits [v0/2, v0/2 + BLOCK_V/2),
        which this program has already loaded (this tile or earlier ones), never one it loads later. The
        barrier makes every warp's loads of the tile complete before any warp stores it (PTX bar.sync
        orders the CTA's memory accesses); with num_stages=1 no load is issued early.
        """
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(t_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(z_ptr + row * stride_z + cols, mask=ok, other=float("-inf"))
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            dz = g * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp(z - lse))
            tl.debug_barrier()
            tl.store(dz_ptr + row * stride_dz + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# Block sizes per (kernel, dtype) on a GPU. The forward's fp32 configuration runs TF32 dots (see the
# module docstring); its tiles are smaller because fp32 operands take twice the registers and shared
# memory. The softmax-gradient pass is bandwidth-bound: one row per program, 2048-wide tiles, 8 fp32
# values per thread. Every entry compiles for sm_90 with 0 spills (python -m vrpo_kernels.inspect).
# Occupancy: the 16-bit forward without bias compiles to 254 registers (184 with bias) at 8 warps: 254
# rounds up to 256 per thread, x 256 threads = 65,536, sm_90's whole register file, so one block (8 of
# 64 warps, 12.5% occupancy) per SM; its 3-stage pipeline (96 KB of shared memory) would allow two.
# Acceptable because the tile loop is a GEMM mainloop whose load latency the 3-stage pipeline hides
# within the block (as in CUTLASS/FlashAttention kernels at one block per SM), and a second block would
# need <= 128 registers per thread, of which the 128 x 128 fp32 accumulator alone takes 64. ptxas takes
# what the one-block budget allows rather than spilling. The forward is a quarter of the op's FLOPs; the
# first GPU run (python -m benchmarks.gpu_check) times the op against CCE's kernel before any retuning.
_GPU_CONFIGS = {
    ("forward", "fp16"): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("forward", "bf16"): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("forward", "fp32"): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("softmax_grad", "fp16"): dict(BLOCK_V=2048, num_warps=8, num_stages=1),
    ("softmax_grad", "bf16"): dict(BLOCK_V=2048, num_warps=8, num_stages=1),
    ("softmax_grad", "fp32"): dict(BLOCK_V=2048, num_warps=8, num_stages=1),
}
# Under TRITON_INTERPRET=1 every program is simulated with numpy: few, large blocks are fastest. The
# vocab tile stays small enough that the tests' V spans several tiles and splits.
_INTERPRETER_CONFIGS = {
    "forward": dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "softmax_grad": dict(BLOCK_V=32, num_warps=4, num_stages=1),
}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _config(kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIGS[kernel])
    return dict(_GPU_CONFIGS[(kernel, _DTYPE_NAMES[dtype])])


def _vocab_split(n_row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split): enough programs to fill the GPU (about 4 per SM), every split non-empty."""
    if device.type == "cuda":
        return _split(n_row_blocks, n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return _split(n_row_blocks, n_tiles, 4)  # the interpreter: still exercise the split and merge logic


def _split(n_row_blocks: int, n_tiles: int, target: int) -> tuple[int, int]:
    """(splits, tiles per split) for about ``target`` programs in all."""
    splits = max(1, min(n_tiles, -(-target // n_row_blocks)))
    per_split = -(-n_tiles // splits)
    return -(-n_tiles // per_split), per_split


def linear_ce_triton_forward(h, weight, bias, targets):
    """Triton forward on gathered rows (h and weight of one dtype, contiguous). Returns (logp, lse) fp32 [n]."""
    n, K = h.shape
    V = weight.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty.clone()
    cfg = _config("forward", h.dtype, h.device)
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    m_blocks = triton.cdiv(n, bm)
    splits, per_split = _vocab_split(m_blocks, triton.cdiv(V, bv), h.device)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=h.device)
    with on_device(h):
        _lse_forward_kernel[(m_blocks, splits)](
            h, weight, bias if bias is not None else h, targets, part[0], part[1], part[2],
            n, V, K, h.stride(0), weight.stride(0), per_split, _FLOOR,
            HAS_BIAS=bias is not None, DOT_PRECISION="tf32", UPCAST_DOT=upcast_dots(h.dtype), **cfg,
        )
    run_max, run_sum, tgt = part[0], part[1], part[2]
    top = run_max.amax(dim=0)
    lse = top + (run_sum * torch.exp(run_max - top)).sum(dim=0).log()
    return tgt.sum(dim=0) - lse, lse


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``out (+)= a @ b`` in one GEMM with fp32 accumulation, written in ``out``'s dtype. On CUDA one
    cuBLAS call (``out_dtype`` lets fp16/bf16 operands write fp32); elsewhere (Triton's interpreter, in
    the tests) the operands are upcast."""
    if a.is_cuda:
        kw = {} if out.dtype == a.dtype else {"out_dtype": out.dtype}
        return torch.addmm(out, a, b, out=out, **kw) if accumulate else torch.mm(a, b, out=out, **kw)
    product = a.float() @ b.float()
    return out.add_(product) if accumulate else out.copy_(product)


def _grad_chunk_rows(n: int, vocab: int, max_buffer_bytes: int) -> int:
    """Rows per backward chunk: the fp32 [rows, V] logits buffer stays within the budget."""
    return max(1, min(n, max_buffer_bytes // (4 * vocab)))


def linear_ce_triton_backward(grad_logp, h, weight, bias, targets, lse, needs=(True, True, True),
                              max_buffer_bytes=DEFAULT_MAX_BUFFER_BYTES):
    """Backward of the Triton path (launches in the module docstring); returns (d_h, d_weight, d_bias)
    in the inputs' dtypes (None where not needed)."""
    need_h, need_w, need_b = needs
    n, K = h.shape
    V = weight.shape[0]
    if n == 0:
        return (
            torch.zeros_like(h) if need_h else None,
            torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(bias) if need_b else None,
        )
    g = grad_logp.float().contiguous()
    rows = _grad_chunk_rows(n, V, max_buffer_bytes)
    one_chunk = rows >= n
    buf = torch.empty(rows, V, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_h else None
    dw = None
    if need_w:  # one chunk writes d_weight directly; several accumulate in fp32
        dw = torch.empty_like(weight) if one_chunk else torch.empty(V, K, dtype=torch.float32, device=h.device)
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_b else None
    cfg = _config("softmax_grad", h.dtype, h.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        hr, z = h[r0:r1], buf[: r1 - r0]
        _gemm(hr, weight.T, out=z)
        dz = z if h.dtype == torch.float32 else z.view(h.dtype)[:, :V]
        with on_device(h):
            _softmax_grad_kernel[(r1 - r0,)](
                z, dz, bias if bias is not None else z, targets[r0:r1], lse[r0:r1], g[r0:r1], V, z.stride(0),
                dz.stride(0), HAS_BIAS=bias is not None, **cfg,
            )
        if need_h:
            _gemm(dz, weight, out=dh[r0:r1])
        if need_w:
            _gemm(dz.T, hr, out=dw, accumulate=r0 > 0)
        if need_b:
            db += dz.sum(dim=0, dtype=torch.float32)
    return (
        dh,
        dw.to(weight.dtype) if need_w else None,
        db.to(bias.dtype) if need_b else None,
    )


class _StreamedLinearCE(torch.autograd.Function):
    """log p(target) of gathered rows by the ``impl`` path (chunked PyTorch or Triton); saves h, the LSE
    per row, references to weight, bias, targets and, on the torch path when they fit the budget, the
    softmax numerators (:class:`_Kept`)."""

    @staticmethod
    def forward(ctx, impl, max_buffer_bytes, h, weight, bias, targets):
        with torch.autocast(h.device.type, enabled=False):
            if impl == "triton":
                (logp, lse), kept = linear_ce_triton_forward(h, weight, bias, targets), None
            else:
                logp, lse, kept = linear_ce_torch_forward(h, weight, bias, targets, max_buffer_bytes, keep=True)
        ctx.impl, ctx.max_buffer_bytes = impl, max_buffer_bytes
        # The kept chunks are intermediates, held on ctx (not save_for_backward) so that the backward can
        # free each one once used; that peak then stays near the kept buffer instead of buffer + d_weight.
        ctx.kept, ctx.had_kept = kept, kept is not None
        ctx.save_for_backward(h, weight, bias, targets, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        h, weight, bias, targets, lse = ctx.saved_tensors
        if ctx.had_kept and ctx.kept is None:
            raise RuntimeError(
                "masked_linear_ce: a second backward through a call that kept its softmax (the first one freed "
                "it); for retain_graph=True pass a max_buffer_bytes below the logits' size (4 * n_selected * V)"
            )
        kept, ctx.kept = ctx.kept, None
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[3], bias is not None and ctx.needs_input_grad[4])
        with torch.autocast(h.device.type, enabled=False):
            if ctx.impl == "triton":
                dh, dw, db = linear_ce_triton_backward(grad_logp, h, weight, bias, targets, lse, needs,
                                                       ctx.max_buffer_bytes)
            else:
                dh, dw, db = linear_ce_torch_backward(grad_logp, h, weight, bias, targets, lse, kept, needs,
                                                      ctx.max_buffer_bytes)
        return None, None, dh, dw, db, None


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _selected_rows(row_mask: torch.Tensor, n: int) -> torch.Tensor:
    """int64 index [n_sel] of the selected rows from a bool [N] mask or an integer index."""
    if not torch.is_tensor(row_mask):
        raise TypeError(f"masked_linear_ce: row_mask must be a tensor, got {type(row_mask).__name__}")
    if row_mask.dtype == torch.bool:
        if row_mask.shape != (n,):
            raise ValueError(f"masked_linear_ce: a bool row_mask must have shape [N] = [{n}], got {tuple(row_mask.shape)}")
        return row_mask.nonzero()[:, 0]
    if row_mask.dtype.is_floating_point or row_mask.dtype.is_complex or row_mask.dim() != 1:
        raise ValueError(
            f"masked_linear_ce: row_mask must be a bool [N] mask or a 1-D integer index of rows, "
            f"got {row_mask.dtype} {tuple(row_mask.shape)}"
        )
    rows = row_mask.long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"masked_linear_ce: row_mask indexes rows outside [0, {n})")
    if rows.numel() > 1 and torch.unique(rows).numel() != rows.numel():
        raise ValueError("masked_linear_ce: row_mask, an index of rows, lists a row more than once")
    return rows


def _check(hidden, weight, targets, row_weight, bias, max_buffer_bytes):
    if hidden.dim() != 2:
        raise ValueError(f"masked_linear_ce: hidden must be [N, H], got {tuple(hidden.shape)}")
    n, H = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"masked_linear_ce: weight must be [V, H] with H={H}, got {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"masked_linear_ce: {name} must be fp32, fp16 or bf16, got {t.dtype}")
    if targets.shape != (n,) or targets.dtype.is_floating_point:
        raise ValueError(f"masked_linear_ce: targets must be an integer tensor [N] = [{n}], got {targets.dtype} {tuple(targets.shape)}")
    if row_weight.shape != (n,):
        raise ValueError(f"masked_linear_ce: row_weight must be [N] = [{n}], got {tuple(row_weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"masked_linear_ce: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if isinstance(max_buffer_bytes, bool) or not isinstance(max_buffer_bytes, int) or max_buffer_bytes <= 0:
        raise ValueError(f"masked_linear_ce: max_buffer_bytes must be a positive int (bytes) or None, got {max_buffer_bytes!r}")


def _triton_operands(hidden_rows, weight, bias):
    """(h, weight, bias) for the Triton path: contiguous, in the autocast dtype under autocast, else in
    the weight's dtype. The casts are differentiable, so gradients reach the original tensors."""
    device = hidden_rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    h = hidden_rows.to(dtype).contiguous()
    return h, weight.to(dtype).contiguous(), bias.to(dtype).contiguous() if bias is not None else None


def _tf32_allowed() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def masked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    row_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    *,
    max_buffer_bytes: int | None = None,
) -> torch.Tensor:
    """Weighted target log-probabilities of the selected rows under a linear head.

    Args:
        hidden: [N, H] fp32, bf16 or fp16 hidden states.
        weight: [V, H] head weight; bias: [V] or None.
        targets: int [N] target ids (only selected rows are read; they must lie in [0, V)).
        row_weight: [N] per-row weights (e.g. the ELBO weight ``L/l`` of the row's sample).
        row_mask: bool [N], or an integer index [n_sel] of the selected rows.
        impl: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (see :mod:`vrpo_kernels.dispatch`);
            ``"auto"`` with fp32 operands on CUDA takes the Triton path only when TF32 is allowed.
        max_buffer_bytes: the largest intermediate the op may hold, in bytes (default
            :data:`DEFAULT_MAX_BUFFER_BYTES`, 1 GiB). The torch path keeps the selected rows' logits
            from the forward for the backward (one GEMM fewer) when they fit, and otherwise recomputes
            them in chunks of at most this size; the Triton backward sizes its row chunks by it.
            ``"eager"`` ignores it.

    Returns:
        float32 [N], ``row_weight[i] * log_softmax(hidden[i] @ weight.T + bias)[targets[i]]`` on the
        selected rows and 0 elsewhere. Differentiable w.r.t. hidden, weight, bias and row_weight.
    """
    auto = impl == "auto"
    impl = resolve_impl(impl, hidden, "masked_linear_ce")
    budget = DEFAULT_MAX_BUFFER_BYTES if max_buffer_bytes is None else max_buffer_bytes
    _check(hidden, weight, targets, row_weight, bias, budget)
    n = hidden.shape[0]
    rows = _selected_rows(row_mask, n)
    if impl == "eager":
        mask = torch.zeros(n, dtype=torch.bool, device=hidden.device).index_fill_(0, rows, True)
        return masked_linear_ce_eager(hidden, weight, targets, row_weight, mask, bias)
    tgt = targets[rows].long()
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= weight.shape[0]):
        raise ValueError(f"masked_linear_ce: targets of selected rows must lie in [0, {weight.shape[0]})")
    h, weight_c, bias_c = hidden[rows], weight, bias  # only the selected rows ever reach a matmul
    if impl == "triton":
        h, weight_c, bias_c = _triton_operands(h, weight, bias)
        if auto and weight_c.dtype == torch.float32 and not _tf32_allowed():
            impl, h, weight_c, bias_c = "torch", hidden[rows], weight, bias
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grads:
        logp = _StreamedLinearCE.apply(impl, budget, h, weight_c, bias_c, tgt)
    elif impl == "triton":  # the reference model's path: a plain call, nothing kept for backward
        logp = linear_ce_triton_forward(h, weight_c, bias_c, tgt)[0]
    else:
        logp = linear_ce_torch_forward(h, weight_c, bias_c, tgt, budget)[0]
    vals = logp * row_weight[rows].float()
    return torch.zeros(n, dtype=torch.float32, device=hidden.device).index_put((rows,), vals)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (python -m vrpo_kernels.inspect)
# --------------------------------------------------------------------------------------------------

# Pointer arguments of each kernel: "in" (the compute dtype), fp32, or int64.
_AOT_POINTERS = {
    "forward": {"h_ptr": "in", "w_ptr": "in", "b_ptr": "in", "t_ptr": "i64", "part_max_ptr": "fp32",
                "part_sum_ptr": "fp32", "part_tgt_ptr": "fp32"},
    "softmax_grad": {"z_ptr": "fp32", "dz_ptr": "in", "b_ptr": "in", "t_ptr": "i64", "lse_ptr": "fp32",
                     "g_ptr": "fp32"},
}


def _aot_scalars(kind: str, dtype: str, cfg: dict, n: int, H: int, V: int, sms: int) -> dict:
    """The scalar arguments a call on ``n`` selected rows passes, as the launchers above compute them."""
    if kind == "forward":
        _, per_split = _split(-(-n // cfg["BLOCK_M"]), -(-V // cfg["BLOCK_V"]), 4 * sms)
        return {"n": n, "V": V, "K": H, "stride_h": H, "stride_w": H, "tiles_per_split": per_split,
                "floor": _FLOOR}
    # The fp32 logits buffer [rows, V]; 16-bit dz is its storage viewed in the compute dtype.
    return {"V": V, "stride_z": V, "stride_dz": V if dtype == "fp32" else 2 * V}


def aot_specs() -> list[dict]:
    """Every kernel configuration the dispatch launches on an H100 (132 SMs) at LLaDA's head (H=4096,
    V=126464), for a batch of 4001 selected rows (not a multiple of 16, as the JIT would see most calls).

    Each entry: name, fn (the jit function), signature, constexprs, attrs, num_warps, num_stages.
    """
    if not triton_available():
        return []
    H, V, n, sms = 4096, 126464, 4001, 132
    specs = []
    for (kind, dtype), cfg in _GPU_CONFIGS.items():
        fn = _lse_forward_kernel if kind == "forward" else _softmax_grad_kernel
        ptrs = {arg: dtype if ty == "in" else ty for arg, ty in _AOT_POINTERS[kind].items()}
        tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        if kind == "forward":
            tiles.update(DOT_PRECISION="tf32", UPCAST_DOT=False)
        for has_bias in (False, True):
            specs.append(aot_spec(
                f"masked_linear_ce.{kind}[{dtype},bias={int(has_bias)},H={H},V={V}]", fn, ptrs,
                _aot_scalars(kind, dtype, cfg, n, H, V, sms), {"HAS_BIAS": has_bias, **tiles},
                cfg["num_warps"], cfg["num_stages"],
            ))
    return specs
