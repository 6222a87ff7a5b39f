"""The ``"torch"`` path: SDPA with the block-diagonal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import _repeat_kv, segment_mask


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
