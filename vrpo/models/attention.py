"""Attention backends for LLaDA on transformers, and the ``"vrpo_triton"`` registration.

``attn_implementation`` picks one by name:

* ``"sdpa"`` (the default): ``torch.nn.functional.scaled_dot_product_attention``;
* ``"eager"``: transformers' plain matmul-softmax attention;
* ``"flash_attention_2"``: flash-attn's kernels (needs the ``flash-attn`` package and a CUDA device);
* ``"vrpo_triton"``: :func:`vrpo_kernels.bidirectional_attention`, registered in transformers'
  ``AttentionInterface`` (and ``AttentionMaskInterface``, which hands it the 2D padding mask unexpanded).
  Packed rows reach it as ``segment_ids`` [B, S], never as an [S, S] mask.

The kernel implementation ``"vrpo_triton"`` uses is ``impl="auto"`` unless overridden, innermost first, by
the :func:`attention_impl` context manager or the ``VRPO_ATTENTION_IMPL`` environment variable
(``auto`` | ``triton`` | ``torch``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from vrpo_kernels import bidirectional_attention
from vrpo_kernels.attention import LastCallCache

from ..estimator.packing import BACKENDS

VRPO_TRITON = "vrpo_triton"
IMPL_ENV = "VRPO_ATTENTION_IMPL"
_IMPLS = ("auto", "triton", "torch")
_impl_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("vrpo_attention_impl", default=None)


def current_attention_impl() -> str:
    """The ``impl=`` that ``"vrpo_triton"`` passes to :func:`vrpo_kernels.bidirectional_attention` now."""
    impl = _impl_override.get() or os.environ.get(IMPL_ENV) or "auto"
    if impl not in _IMPLS:
        raise ValueError(f"{IMPL_ENV}={impl!r} is not one of {_IMPLS}")
    return impl


@contextlib.contextmanager
def attention_impl(impl: str):
    """Force the kernel implementation of ``"vrpo_triton"`` attention inside a ``with`` block.

    ``impl``: ``"auto"``, ``"triton"`` (the Triton kernel; on the CPU it needs ``TRITON_INTERPRET=1``) or
    ``"torch"`` (SDPA with a block-diagonal mask).
    """
    if impl not in _IMPLS:
        raise ValueError(f"attention_impl: impl={impl!r} is not one of {_IMPLS}")
    token = _impl_override.set(impl)
    try:
        yield
    finally:
        _impl_override.reset(token)


def _segments_for(query: torch.Tensor, attention_mask, segment_ids) -> torch.Tensor | None:
    B, S = query.shape[0], query.shape[2]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "vrpo_triton attention takes a 2D padding mask or segment_ids, got a "
                f"{attention_mask.dim()}D attention_mask {tuple(attention_mask.shape)}; for packed rows pass "
                "segment_ids (see vrpo.models.packing_kwargs)"
            )
        if attention_mask.shape != (B, S):
            raise ValueError(
                f"vrpo_triton: attention_mask {tuple(attention_mask.shape)} does not match [B, S] = {(B, S)}"
            )
    if segment_ids is not None and segment_ids.shape != (B, S):
        raise ValueError(f"vrpo_triton: segment_ids {tuple(segment_ids.shape)} does not match [B, S] = {(B, S)}")
    if attention_mask is None:
        return segment_ids
    # One tensor per forward: every layer gets the same one, so the kernels' segment layout (cached
    # on that tensor) is computed once, not once per layer.
    return _padded_segments(attention_mask, segment_ids)


@LastCallCache
def _padded_segments(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """segment_ids (zeros when None) with -1 where the 2D padding mask is 0."""
    base = (
        segment_ids
        if segment_ids is not None
        else torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
    )
    return torch.where(attention_mask.to(device=base.device, dtype=torch.bool), base, -1)


def vrpo_triton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    segment_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> ([B, S, Hq, D], None).

    ``attention_mask`` is the 2D padding mask [B, S] (1 = token) or None; ``segment_ids`` [B, S] (negative =
    padding) blocks attention across packed samples. Padding queries get a zero output.
    """
    if is_causal is None:
        is_causal = getattr(getattr(module, "config", None), "is_causal", True)
    if is_causal:
        raise ValueError(
            "vrpo_triton attention is bidirectional only: set config.is_causal=False (load_llada does) "
            "or do not pass is_causal=True"
        )
    if dropout:
        raise NotImplementedError(f"vrpo_triton attention has no dropout (got dropout={dropout}); use sdpa or eager")
    if kwargs.get("output_attentions"):
        raise ValueError("vrpo_triton attention does not return attention weights; use attn_implementation='eager'")
    if query.shape[2] != key.shape[2]:
        raise ValueError("vrpo_triton attention needs as many keys as queries (no KV cache)")
    seg = _segments_for(query, attention_mask, segment_ids)
    out = bidirectional_attention(query, key, value, segment_ids=seg, scale=scaling, impl=current_attention_impl())
    # The Triton path writes [B, S, H, D] directly, so this is a view; the torch path may copy.
    return out.transpose(1, 2).contiguous(), None


def vrpo_triton_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function for ``"vrpo_triton"``: the 2D padding mask, None if it masks nothing."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"vrpo_triton: attention_mask {tuple(attention_mask.shape)} does not match "
            f"[B, S] = {(batch_size, kv_length)}"
        )
    return None if bool(attention_mask.all()) else attention_mask


def register_vrpo_attention() -> None:
    """Register ``"vrpo_triton"`` with transformers (idempotent; done when :mod:`vrpo.models` is imported)."""
    AttentionInterface.register(VRPO_TRITON, vrpo_triton_attention)
    AttentionMaskInterface.register(VRPO_TRITON, vrpo_triton_mask)


def check_backend(attn_implementation: str | None, device: torch.device | str | None = None) -> str:
    """Validate an ``attn_implementation`` name and return it (``None`` -> ``"sdpa"``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` naming what is missing when
    ``"flash_attention_2"`` cannot run here.
    """
    name = attn_implementation or "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not one of {BACKENDS}")
    if name == "flash_attention_2":
        missing = []
        if importlib.util.find_spec("flash_attn") is None:
            missing.append("the flash-attn package (pip install 'vrpo[flash]')")
        if not torch.cuda.is_available():
            missing.append("a CUDA device")
        elif device is not None and torch.device(device).type != "cuda":
            missing.append(f"the model on a CUDA device (device={device!s})")
        if missing:
            raise RuntimeError(
                "attn_implementation='flash_attention_2' needs "
                + " and ".join(missing)
                + "; use 'sdpa' or 'vrpo_triton'"
            )
    if name == VRPO_TRITON:
        register_vrpo_attention()
    return name


register_vrpo_attention()
