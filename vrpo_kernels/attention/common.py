"""The constants and input checks every path of :func:`~vrpo_kernels.attention.bidirectional_attention`
shares, and the block-diagonal mask of the PyTorch paths."""

from __future__ import annotations

import math

import torch

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
