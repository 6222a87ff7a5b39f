"""The one entry point, :func:`bidirectional_attention`, with ``impl=``."""

from __future__ import annotations

import functools
import logging

import torch

from ..dispatch import resolve_impl
from .common import _IMPLS, MAX_TRITON_HEAD_DIM, _check_inputs
from .reference import attention_eager
from .torch_path import attention_torch
from .triton_path import attention_triton

logger = logging.getLogger(__package__)  # vrpo_kernels.attention, the logger's name before the package split


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
