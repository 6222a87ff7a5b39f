"""The ``"eager"`` path (matmul, masked softmax, matmul) and the float64 reference."""

from __future__ import annotations

from .common import _default_scale, _repeat_kv, segment_mask


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
