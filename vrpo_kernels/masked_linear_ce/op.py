"""The entry point of the masked linear cross-entropy: argument checks, the ``impl`` dispatch and the
autograd Function shared by the streamed paths (``"torch"`` and ``"triton"``)."""

from __future__ import annotations

import torch

from ..dispatch import resolve_impl
from . import torch_path, triton_path
from .common import DEFAULT_MAX_BUFFER_BYTES
from .common import DTYPE_NAMES as _DTYPE_NAMES
from .reference import masked_linear_ce_eager


class _StreamedLinearCE(torch.autograd.Function):
    """log p(target) of gathered rows by the ``impl`` path (chunked PyTorch or Triton); saves h, the LSE
    per row, references to weight, bias, targets and, on the torch path when they fit the budget, the
    softmax numerators (:class:`_Kept`)."""

    @staticmethod
    def forward(ctx, impl, max_buffer_bytes, h, weight, bias, targets):
        with torch.autocast(h.device.type, enabled=False):
            if impl == "triton":
                (logp, lse), kept = triton_path.linear_ce_triton_forward(h, weight, bias, targets), None
            else:
                logp, lse, kept = torch_path.linear_ce_torch_forward(
                    h, weight, bias, targets, max_buffer_bytes, keep=True
                )
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
                dh, dw, db = triton_path.linear_ce_triton_backward(
                    grad_logp, h, weight, bias, targets, lse, needs, ctx.max_buffer_bytes
                )
            else:
                dh, dw, db = torch_path.linear_ce_torch_backward(
                    grad_logp, h, weight, bias, targets, lse, kept, needs, ctx.max_buffer_bytes
                )
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
            raise ValueError(
                f"masked_linear_ce: a bool row_mask must have shape [N] = [{n}], got {tuple(row_mask.shape)}"
            )
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
        raise ValueError(
            f"masked_linear_ce: targets must be an integer tensor [N] = [{n}], got {targets.dtype} {tuple(targets.shape)}"  # noqa: E501
        )
    if row_weight.shape != (n,):
        raise ValueError(f"masked_linear_ce: row_weight must be [N] = [{n}], got {tuple(row_weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"masked_linear_ce: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if isinstance(max_buffer_bytes, bool) or not isinstance(max_buffer_bytes, int) or max_buffer_bytes <= 0:
        raise ValueError(
            f"masked_linear_ce: max_buffer_bytes must be a positive int (bytes) or None, got {max_buffer_bytes!r}"
        )


def _triton_operands(hidden_rows, weight, bias):
    """(h, weight, bias) for the Triton path: contiguous, in the autocast dtype under autocast, else in
    the weight's dtype. The casts are differentiable, so gradients reach the original tensors."""
    device = hidden_rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    h = hidden_rows.to(dtype).contiguous()
    return h, weight.to(dtype).contiguous(), bias.to(dtype).contiguous() if bias is not None else None


def _tf32_allowed() -> bool:
    return triton_path.dot_precision(torch.float32) == "tf32"


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
            ``"auto"`` with fp32 operands on CUDA takes the Triton path only when TF32 is allowed
            (:func:`vrpo_kernels.dispatch.fp32_matmul_precision`); ``"triton"`` with fp32 follows that setting
            (TF32 or IEEE dots), never TF32 silently.
        max_buffer_bytes: the largest logits buffer the op may hold, in bytes (default
            :data:`DEFAULT_MAX_BUFFER_BYTES`, 1 GiB). The torch path keeps the selected rows' logits
            from the forward for the backward (one GEMM fewer) when they fit, and otherwise recomputes
            them in chunks of at most this size; the Triton backward sizes its vocabulary chunks by it.
            ``"eager"`` ignores it. Everything the op holds besides its inputs is
            :func:`vrpo_kernels.masked_linear_ce.memory.working_set_bytes`.

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
        logp = triton_path.linear_ce_triton_forward(h, weight_c, bias_c, tgt)[0]
    else:
        logp = torch_path.linear_ce_torch_forward(h, weight_c, bias_c, tgt, budget)[0]
    vals = logp * row_weight[rows].float()
    return torch.zeros(n, dtype=torch.float32, device=hidden.device).index_put((rows,), vals)
