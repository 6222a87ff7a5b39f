"""Bidirectional (non-causal) attention over packed, variable-length rows.

``segment_ids`` [B, S] (int) says which sample each token belongs to: a query attends only to keys
with the same segment id. Tokens with a negative segment id are padding: they attend to nothing,
nobody attends to them, and their output is 0. ``segment_ids=None`` means one sample per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_impl


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S]: True where query i may attend to key j (same, non-negative segment)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids >= 0)[:, :, None] & (segment_ids >= 0)[:, None, :]
    return (same & valid)[:, None]


def attention_torch(q, k, v, segment_ids=None, scale=None):
    """SDPA with a block-diagonal mask. q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
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


def bidirectional_attention(q, k, v, segment_ids=None, scale=None, impl="auto"):
    """Non-causal attention. q [B, Hq, S, D], k/v [B, Hkv, S, D] (Hq % Hkv == 0), segment_ids [B, S] or None.

    Returns [B, Hq, S, D] in q's dtype.
    """
    impl = resolve_impl(impl, q, "bidirectional_attention", ("auto", "triton", "torch"))
    if impl == "triton":
        raise NotImplementedError("bidirectional_attention: the Triton kernel has not landed yet")
    return attention_torch(q, k, v, segment_ids, scale)
