"""Masked linear cross-entropy: the LM head and the per-token ELBO term in one op.

For every selected row ``i``::

    out[i] = row_weight[i] * log_softmax(hidden[i] @ weight.T + bias)[targets[i]]

and ``out[i] = 0`` for rows that are not selected. At LLaDA's vocabulary (V = 126,464) the logits
of a few thousand rows are gigabytes; this op never holds them. It gathers the selected rows, streams
the head weight in vocabulary tiles with an online (running max + rescaled sum) logsumexp in fp32,
saves only the logsumexp per row, and recomputes the tiles in the backward pass.

Three implementations behind one entry point, :func:`masked_linear_ce` (``impl=``):

* ``"eager"``: :func:`masked_linear_ce_eager`, full logits, the readable reference;
* ``"torch"``: the streamed algorithm in chunked PyTorch (the CPU path);
* ``"triton"``: the same algorithm as fused Triton kernels (``_lse_forward_kernel``,
  ``_grad_hidden_kernel``, ``_grad_weight_kernel``);

both through one autograd Function, :class:`_StreamedLinearCE`.

Gradients flow to ``hidden``, ``weight``, ``bias`` (and ``row_weight``, applied outside the fused
part). Under ``torch.no_grad()`` (the reference model) nothing is saved for backward.
"""

from __future__ import annotations

import os

import torch

from .dispatch import resolve_impl, triton_available

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

# Elements of one [vocab, rows] logits chunk: 8M fp32 = 32 MB, a quarter of a 256-wide head weight at
# LLaDA's vocabulary. On this shared 2-core machine every parallel op pays for OpenMP barriers that
# stall whenever another process holds a core, so fewer, larger chunks win: measured interleaved, 4M
# took ~1.3x as long as 8M, and 16M was no faster than 8M while using 32 MB more.
_CHUNK_ELEMS = 1 << 23
# Logits are scaled by log2(e) inside the GEMM so that the chunk passes use exp2, several times faster
# than exp on this CPU (torch's vectorised exp2 vs exp, same 1-ulp accuracy class).
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_CHUNK_ROWS = 2048


def _chunks(n: int, vocab: int) -> tuple[int, int]:
    """(rows, vocab) per chunk: all rows up to _MAX_CHUNK_ROWS, vocab a multiple of 256."""
    rows = max(1, min(n, _MAX_CHUNK_ROWS))
    cols = max(256, (_CHUNK_ELEMS // rows) // 256 * 256)
    return rows, min(cols, vocab)


# The chunk GEMMs are most of the cost of this path: four [rows x H x vocab] products per forward +
# backward. On x86 CPUs oneDNN's fp32 GEMM (what torch.compile uses for packed linears) runs at about
# twice the speed of torch.mm's MKL sgemm on this machine's AMD cores (measured side by side under the
# same load: ~100-150 vs ~50-65 GFLOP/s), at fp32 accuracy; it reads transposed operands in place and
# adds a per-column bias in the same pass. It is reached through a private op, so it is probed once
# (against torch.addmm, with transposed views) and torch.addmm is the fallback. VRPO_CPU_GEMM=mkl
# forces the fallback.
_ONEDNN: bool | None = None


def _onednn_gemm_available() -> bool:
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("VRPO_CPU_GEMM", "onednn") != "mkl":
            try:
                g = torch.Generator().manual_seed(0)
                a, b, c = torch.randn(37, 19, generator=g), torch.randn(23, 19, generator=g), torch.randn(23, generator=g)
                a_t, b_t = torch.randn(19, 37, generator=g).T, torch.randn(19, 23, generator=g).T
                acc = torch.randn(37, 23, generator=g)
                _ONEDNN = all(
                    torch.allclose(_onednn_linear(x, w, bias), x @ w.T + (0 if bias is None else bias), rtol=1e-5, atol=1e-5)
                    for x, w, bias in ((a, b, None), (a_t, b, None), (a, b_t, c), (a_t, b_t, c))
                ) and torch.allclose(_onednn_linear_add(a_t, b_t, acc), acc + a_t @ b_t.T, rtol=1e-5, atol=1e-5)
            except Exception:  # no oneDNN in this build, or the private op changed
                _ONEDNN = False
    return _ONEDNN


def _onednn_linear(x, w, bias):
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _onednn_linear_add(x, w, acc):
    return torch.ops.mkldnn._linear_pointwise.binary(x, acc, w, None, "add")


def _linear_add(x: torch.Tensor, w: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``acc + x @ w.T`` as a new tensor, the addition fused into the GEMM."""
    if x.device.type == "cpu" and _onednn_gemm_available():
        try:
            return _onednn_linear_add(x, w, acc)
        except RuntimeError:
            pass
    return torch.addmm(acc, x, w.T)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)``, bias per output column: fp32 matrices, transposed views welcome."""
    if x.device.type == "cpu" and _onednn_gemm_available():
        try:
            return _onednn_linear(x, w, bias)
        except RuntimeError:  # a layout oneDNN rejects (exotic strides): torch.addmm takes anything
            pass
    return x @ w.T if bias is None else torch.addmm(bias, x, w.T)


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


def _chunk_lse2(w, b, h2, running):
    """Base-2 log-sum-exp over the chunk's vocabulary per row, fp32 [rows], for base-2 logits; shifted
    by ``running`` (the base-2 log-sum-exp of the chunks so far, or None for the first chunk)."""
    if running is not None:
        # Shifting by the running log-sum-exp keeps every exp2 <= 2^127 unless this chunk holds a logit
        # that far above everything seen so far; only then (a non-finite sum) take the max-shifted path.
        s = _shifted_logits_t(w, b, h2, running).exp2_().sum(dim=0)
        if bool(torch.isfinite(s).all()):
            return running + s.log2()
    zt = _shifted_logits_t(w, b, h2, None)
    top = zt.amax(dim=0)
    return top + zt.sub_(top).exp2_().sum(dim=0).log2()


def linear_ce_torch_forward(h: torch.Tensor, weight, bias, targets):
    """Streamed forward on gathered rows. h [n, H] (any float dtype), weight [V, H], bias [V] or None,
    targets int64 [n]. Returns ``(logp, lse)``, both fp32 [n]."""
    n, V = h.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return lse, lse.clone()
    rows, cols = _chunks(n, V)
    chunk = _WeightChunks(weight, bias, cols, scale=_LOG2E)
    h32 = h.float()
    h2 = h32 * _LOG2E
    for r0 in range(0, n, rows):
        running = None
        for v0 in range(0, V, cols):
            part = _chunk_lse2(*chunk(v0, min(V, v0 + cols)), h2[r0 : r0 + rows], running)
            running = part if running is None else torch.logaddexp2(running, part)
        lse[r0 : r0 + rows] = running * _LN2
    return _target_logits(h32, weight, bias, targets) - lse, lse


def _accumulate(out: torch.Tensor, part: torch.Tensor, first: bool):
    if first:
        out.copy_(part)
    else:
        out.add_(part)


def linear_ce_torch_backward(grad_logp, h, weight, bias, targets, lse, needs=(True, True, True)):
    """Gradients of ``sum(grad_logp * logp)`` for :func:`linear_ce_torch_forward`, recomputing the logits
    chunk by chunk. Returns ``(d_h, d_weight, d_bias)`` in the inputs' dtypes (None where not needed).

    With ``P = softmax`` and ``g = grad_logp``: ``dZ = g * (onehot - P)``, so
    ``d_h = g * (W[y] - P @ W)``, ``d_W = P^T @ (-g * h) + scatter(y, g * h)``,
    ``d_b = P^T @ (-g) + scatter(y, g)``. Only ``P^T`` is streamed through the chunks, each one a
    GEMM with ``-lse`` as its bias and one in-place exp; the per-row ``g`` is folded into the small
    operands, and the one-hot part touches the targets only.
    """
    need_h, need_w, need_b = needs
    n, H = h.shape
    V = weight.shape[0]
    dev = h.device
    g = grad_logp.float()
    h32 = h.float()
    # (P @ W)^T per row chunk, [H, rows] each: accumulated by GEMMs with a fused add.
    pw_t = {} if need_h else None
    # Every element of dw / db is written by the first row chunk (n > 0), so they start empty.
    alloc = torch.empty if n else torch.zeros
    dw = alloc(V, H, dtype=torch.float32, device=dev) if need_w else None
    db = alloc(V, dtype=torch.float32, device=dev) if need_b else None
    rows, cols = _chunks(max(n, 1), V)
    chunk = _WeightChunks(weight, bias, cols, scale=_LOG2E)
    h2, lse2 = h32 * _LOG2E, lse * _LOG2E
    for r0 in range(0, n, rows):
        hr, h2r, lr2 = h32[r0 : r0 + rows], h2[r0 : r0 + rows], lse2[r0 : r0 + rows]
        neg_g = -g[r0 : r0 + rows]
        neg_gh_t = (hr * neg_g[:, None]).T.contiguous()  # [H, rows]
        first = r0 == 0
        r = r0
        if need_h:
            pw_t[r] = torch.zeros(H, hr.shape[0], dtype=torch.float32, device=dev)
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            w, b = chunk(v0, v1)
            pt = _shifted_logits_t(w, b, h2r, lr2).exp2_()  # softmax chunk, transposed [vocab, rows]
            # Both products keep P^T as it lies in memory ([vocab, rows]), the fast operand layout.
            if need_h:
                pw_t[r] = _linear_add(w.T, pt.T, pw_t[r])  # += W^T @ P^T
            if need_w:
                _accumulate(dw[v0:v1], _linear(pt, neg_gh_t), first)  # P^T @ (-g h)
            if need_b:
                _accumulate(db[v0:v1], pt @ neg_g, first)
    dh = None
    if need_h:
        pw = torch.cat([pw_t[r].T for r in sorted(pw_t)]) if n else torch.zeros(0, H, device=dev)
        dh = (weight[targets].float() - pw).mul_(g[:, None]).to(h.dtype)
    # The one-hot part; index_put_ accumulates serially on the CPU (deterministic) and is far faster
    # there than index_add_.
    if need_w:
        dw.index_put_((targets,), g[:, None] * h32, accumulate=True)
    if need_b:
        db.index_put_((targets,), g, accumulate=True)
    return (
        dh,
        dw.to(weight.dtype) if need_w else None,
        db.to(bias.dtype) if need_b else None,
    )


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------
#
# Three kernels, all on the gathered rows (n of them), each recomputing logit tiles [rows x vocab]
# with tl.dot over the hidden dimension in BLOCK_K steps:
#
# * _lse_forward_kernel, grid (row blocks, vocab splits): online max / rescaled sum per row over its
#   split's vocab tiles, plus the target logit when the target falls in the split. The splits' partial
#   (max, sum) are merged by a tiny logsumexp in PyTorch. Splitting the vocabulary keeps the GPU busy
#   when there are few row blocks (n / BLOCK_M is often below the SM count).
# * _grad_hidden_kernel, grid (row blocks, vocab splits): dZ = g * (onehot - softmax) per tile, then
#   dH[rows] += dZ @ W[tile] into a partial buffer [splits, n, H] owned by (row block, split);
#   the splits are summed afterwards.
# * _grad_weight_kernel, grid (vocab blocks): the same dZ tile, then dW[tile] += dZ^T @ H[rows] and
#   d_bias[tile] += sum(dZ) over all row blocks, into rows of dW that only this program touches.
#
# Why two passes and partial buffers rather than atomics: with one fused backward kernel over
# (row block, vocab block) tiles, both dH and dW would need fp32 atomic adds from many programs.
# Atomic accumulation order depends on scheduling, so gradients would change bit-for-bit from run to
# run; vrpo relies on reproducible runs (same seed, same numbers) to compare policy and reference and
# to debug training. With each output element owned by exactly one program, accumulation is
# race-free and deterministic. The price is one extra recompute of the logit tiles (five matmul
# passes instead of four) and the [splits, n, H] fp32 partial buffer, used (splits > 1) only when there
# are too few row blocks to fill the GPU, and capped at _PARTIAL_BYTES. dW needs no split:
# V / BLOCK_V programs are plenty.

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_h, stride_w,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """fp32 [BLOCK_M, BLOCK_V] logits of rows x cols (masked rows/cols give garbage, not NaN)."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _dlogit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, tgt, lse, g, K, stride_h, stride_w,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """d(g * log p[target]) / d(logits) on one recomputed [rows x cols] tile: g * (onehot - softmax),
        0 outside the rows and the vocabulary. float32 [BLOCK_M, BLOCK_V]."""
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_h, stride_w,
                        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))
        return tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)

    @triton.jit
    def _row_block(t_ptr, n, BLOCK_M: tl.constexpr):
        """This program's vocabulary split, its BLOCK_M rows (of n), which of them exist, their targets."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        return tl.program_id(1), rows, row_ok, tl.load(t_ptr + rows, mask=row_ok, other=-1)

    @triton.jit
    def _lse_forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_max_ptr, part_sum_ptr, part_tgt_ptr,
                            n, V, K, stride_h, stride_w, tiles_per_split,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        split, rows, row_ok, tgt = _row_block(t_ptr, n, BLOCK_M)
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # The host makes every split start on a valid tile, so run_max is finite after the first
        # tile and a later all-padding tile contributes exp(-inf) = 0 instead of NaN.
        v_begin = split * tiles_per_split * BLOCK_V
        for t in range(tiles_per_split):
            cols = v_begin + t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_h, stride_w,
                            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
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
    def _grad_hidden_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_part_ptr,
                            n, V, K, stride_h, stride_w, tiles_per_split,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        split, rows, row_ok, tgt = _row_block(t_ptr, n, BLOCK_M)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        dh_rows = dh_part_ptr + (split * n + rows)[:, None] * K
        v_begin = split * tiles_per_split * BLOCK_V
        for t in range(tiles_per_split):
            cols = v_begin + t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            dz = _dlogit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, tgt, lse, g, K, stride_h, stride_w,
                              HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION).to(w_ptr.dtype.element_ty)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                mask = row_ok[:, None] & k_ok[None, :]
                acc = tl.load(dh_rows + ks[None, :], mask=mask, other=0.0)
                acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
                tl.store(dh_rows + ks[None, :], acc, mask=mask)

    @triton.jit
    def _grad_weight_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr,
                            n, V, K, stride_h, stride_w,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_v = tl.program_id(0)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < n
            tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
            dz = _dlogit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, tgt, lse, g, K, stride_h, stride_w,
                              HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            db += tl.sum(dz, axis=0)
            dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                mask = col_ok[:, None] & k_ok[None, :]
                dw_tile = dw_ptr + cols[:, None] * K + ks[None, :]
                acc = tl.load(dw_tile, mask=mask, other=0.0)
                acc = tl.dot(dzt, h, acc, input_precision=DOT_PRECISION)
                tl.store(dw_tile, acc, mask=mask)
        if HAS_BIAS:
            tl.store(db_ptr + cols, db, mask=col_ok)


# Block sizes per (kernel, dtype) on a GPU. fp32 inputs use IEEE fp32 dots (no TF32) so that the fp32
# path is as exact as the CPU one; its tiles are smaller because fp32 operands take twice the
# registers and shared memory. Every entry compiles for sm_90 with 0 spills (python -m vrpo_kernels.inspect).
_GPU_CONFIGS = {
    ("forward", "fp16"): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("forward", "bf16"): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("forward", "fp32"): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("grad_hidden", "fp16"): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
    ("grad_hidden", "bf16"): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
    ("grad_hidden", "fp32"): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("grad_weight", "fp16"): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
    ("grad_weight", "bf16"): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
    ("grad_weight", "fp32"): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
}
# Under TRITON_INTERPRET=1 every program is simulated with numpy: few, large blocks are fastest. The
# vocab tile stays small enough that the tests' V spans several tiles and splits.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_H100_SMS = 132


def _config(kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIG)
    return dict(_GPU_CONFIGS[(kernel, _DTYPE_NAMES[dtype])])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# Cap on the fp32 [splits, n, H] partial buffer of the d_hidden pass: past it, fewer splits (and a less
# full GPU) rather than memory that grows with n.
_PARTIAL_BYTES = 256 << 20


def _vocab_split(n_row_blocks: int, n_tiles: int, device: torch.device, bytes_per_split: int = 0) -> tuple[int, int]:
    """(splits, tiles per split): enough programs to fill the GPU (about 4 per SM), every split non-empty,
    and at most ``_PARTIAL_BYTES`` of partial buffers when each split needs ``bytes_per_split``."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: still exercise the split and merge logic
    splits = max(1, min(n_tiles, -(-target // n_row_blocks)))
    if bytes_per_split:
        splits = max(1, min(splits, _PARTIAL_BYTES // bytes_per_split))
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
    _lse_forward_kernel[(m_blocks, splits)](
        h, weight, bias if bias is not None else h, targets, part[0], part[1], part[2],
        n, V, K, h.stride(0), weight.stride(0), per_split,
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(h.dtype), **cfg,
    )
    run_max, run_sum, tgt = part[0], part[1], part[2]
    top = run_max.amax(dim=0)
    lse = top + (run_sum * torch.exp(run_max - top)).sum(dim=0).log()
    return tgt.sum(dim=0) - lse, lse


def linear_ce_triton_backward(grad_logp, h, weight, bias, targets, lse, needs=(True, True, True)):
    """Triton backward; returns (d_h, d_weight, d_bias) in the inputs' dtypes (None where not needed)."""
    need_h, need_w, need_b = needs
    n, K = h.shape
    V = weight.shape[0]
    g = grad_logp.float().contiguous()
    b_arg = bias if bias is not None else h
    dh = dw = db = None
    if n == 0:
        return (
            torch.zeros_like(h) if need_h else None,
            torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(bias) if need_b else None,
        )
    if need_h:
        cfg = _config("grad_hidden", h.dtype, h.device)
        m_blocks = triton.cdiv(n, cfg["BLOCK_M"])
        splits, per_split = _vocab_split(m_blocks, triton.cdiv(V, cfg["BLOCK_V"]), h.device, n * K * 4)
        part = torch.zeros(splits, n, K, dtype=torch.float32, device=h.device)
        _grad_hidden_kernel[(m_blocks, splits)](
            h, weight, b_arg, targets, lse, g, part, n, V, K, h.stride(0), weight.stride(0), per_split,
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(h.dtype), **cfg,
        )
        dh = (part[0] if splits == 1 else part.sum(dim=0)).to(h.dtype)
    if need_w or need_b:
        cfg = _config("grad_weight", h.dtype, h.device)
        dw32 = torch.zeros(V, K, dtype=torch.float32, device=h.device)
        db32 = torch.zeros(V, dtype=torch.float32, device=h.device)
        _grad_weight_kernel[(triton.cdiv(V, cfg["BLOCK_V"]),)](
            h, weight, b_arg, targets, lse, g, dw32, db32, n, V, K, h.stride(0), weight.stride(0),
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(h.dtype), **cfg,
        )
        dw = dw32.to(weight.dtype) if need_w else None
        db = db32.to(bias.dtype) if need_b else None
    return dh, dw, db


_STREAMED = {
    "torch": (linear_ce_torch_forward, linear_ce_torch_backward),
    "triton": (linear_ce_triton_forward, linear_ce_triton_backward),
}


class _StreamedLinearCE(torch.autograd.Function):
    """log p(target) of gathered rows, streamed over the vocabulary by the ``impl`` kernels (chunked
    PyTorch or Triton); saves h and the LSE per row (and references to weight, bias, targets)."""

    @staticmethod
    def forward(ctx, impl, h, weight, bias, targets):
        logp, lse = _STREAMED[impl][0](h, weight, bias, targets)
        ctx.impl = impl
        ctx.save_for_backward(h, weight, bias, targets, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        h, weight, bias, targets, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3])
        dh, dw, db = _STREAMED[ctx.impl][1](grad_logp, h, weight, bias, targets, lse, needs)
        return None, dh, dw, db, None


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


def _check(hidden, weight, targets, row_weight, bias):
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


def masked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    row_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    *,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Weighted target log-probabilities of the selected rows under a linear head.

    Args:
        hidden: [N, H] fp32, bf16 or fp16 hidden states.
        weight: [V, H] head weight; bias: [V] or None.
        targets: int [N] target ids (only selected rows are read; they must lie in [0, V)).
        row_weight: [N] per-row weights (e.g. the ELBO weight ``L/l`` of the row's sample).
        row_mask: bool [N], or an integer index [n_sel] of the selected rows.
        impl: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (see :mod:`vrpo_kernels.dispatch`).
        segment_ids: optional int [N]: also sum the rows per segment (e.g. per (sequence, sample)).
        num_segments: the number of segments (default ``segment_ids.max() + 1``).

    Returns:
        float32 [N], ``row_weight[i] * log_softmax(hidden[i] @ weight.T + bias)[targets[i]]`` on the
        selected rows and 0 elsewhere; or float32 [num_segments] of their per-segment sums when
        ``segment_ids`` is given. Differentiable w.r.t. hidden, weight, bias and row_weight.
    """
    impl = resolve_impl(impl, hidden, "masked_linear_ce")
    _check(hidden, weight, targets, row_weight, bias)
    n = hidden.shape[0]
    rows = _selected_rows(row_mask, n)
    if impl == "eager":
        mask = torch.zeros(n, dtype=torch.bool, device=hidden.device).index_fill_(0, rows, True)
        out = masked_linear_ce_eager(hidden, weight, targets, row_weight, mask, bias)
    else:
        tgt = targets[rows].long()
        if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= weight.shape[0]):
            raise ValueError(f"masked_linear_ce: targets of selected rows must lie in [0, {weight.shape[0]})")
        h = hidden[rows]  # only the selected rows ever reach a matmul
        weight_c, bias_c = weight, bias
        if impl == "triton":
            weight_c = weight.contiguous()
            h = h.to(weight.dtype).contiguous()
            bias_c = bias.contiguous() if bias is not None else None
        grads = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)
        )
        if grads:
            logp = _StreamedLinearCE.apply(impl, h, weight_c, bias_c, tgt)
        else:
            # The reference model's path: a plain call, so nothing can be kept for backward.
            logp = _STREAMED[impl][0](h, weight_c, bias_c, tgt)[0]
        vals = logp * row_weight[rows].float()
        out = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_put((rows,), vals)
    if segment_ids is None:
        return out
    if segment_ids.shape != (n,) or segment_ids.dtype.is_floating_point:
        raise ValueError(f"masked_linear_ce: segment_ids must be an integer tensor [N] = [{n}], got {tuple(segment_ids.shape)}")
    if num_segments is None:
        num_segments = int(segment_ids.max()) + 1 if n else 0
    return torch.zeros(num_segments, dtype=torch.float32, device=out.device).index_add(0, segment_ids.long(), out)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (python -m vrpo_kernels.inspect)
# --------------------------------------------------------------------------------------------------


def aot_specs() -> list[dict]:
    """Every kernel configuration the dispatch launches on an H100 at LLaDA's head (H=4096, V=126464).

    Each entry: name, fn (the jit function), signature, constexprs, attrs, num_warps, num_stages.
    """
    if not triton_available():
        return []
    H, V = 4096, 126464
    kinds = {
        "forward": (_lse_forward_kernel, ["h", "w", "b", "t", "pmax", "psum", "ptgt"]),
        "grad_hidden": (_grad_hidden_kernel, ["h", "w", "b", "t", "lse", "g", "dh"]),
        "grad_weight": (_grad_weight_kernel, ["h", "w", "b", "t", "lse", "g", "dw", "db"]),
    }
    fp32_ptrs = {"pmax", "psum", "ptgt", "lse", "g", "dh", "dw", "db"}
    specs = []
    for (kind, dtype), cfg in _GPU_CONFIGS.items():
        fn, ptrs = kinds[kind]
        for has_bias in (False, True):
            sig, attrs = {}, {}
            for i, p in enumerate(fn.arg_names):
                if i < len(ptrs):
                    name = ptrs[i]
                    sig[p] = "*fp32" if name in fp32_ptrs else ("*i64" if name == "t" else f"*{dtype}")
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif p in ("n", "tiles_per_split"):
                    sig[p] = "i32"
                elif p in ("V", "K", "stride_h", "stride_w"):
                    sig[p] = "i32"
                    attrs[(i,)] = [["tt.divisibility", 16]]  # 126464 and 4096 are multiples of 16
                else:
                    sig[p] = "constexpr"
            const = {
                "HAS_BIAS": has_bias,
                "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K")},
            }
            specs.append(dict(
                name=f"masked_linear_ce.{kind}[{dtype},bias={int(has_bias)},H={H},V={V}]",
                fn=fn, signature=sig, constexprs=const, attrs=attrs,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            ))
    return specs
