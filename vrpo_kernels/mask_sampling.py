"""Mask sampling for the masked-diffusion ELBO: which response tokens each sample hides.

Given a row's response positions and a per-sample *level*, draw one mask per sample:

* ``counts`` (the l-uniform estimator): exactly ``counts[b, j]`` response positions of row ``b``
  are masked, chosen uniformly without replacement;
* ``probs`` (the t-Bernoulli estimator): every response position is masked independently with
  probability ``probs[b, j]``.

Positions outside ``response_mask`` (prompt, padding) are never masked.

Entry point: :func:`sample_masks` with ``impl=``. The ``"torch"`` path draws from a
``torch.Generator``; the ``"triton"`` path derives its bits from ``(seed, offset)`` with Philox, so the
same seed reproduces the same masks on the GPU. The two give the same distribution, not the same bits.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_impl


def _check_inputs(response_mask: torch.Tensor, counts, probs) -> torch.Tensor:
    if response_mask.dtype != torch.bool or response_mask.dim() != 2:
        raise ValueError(
            f"sample_masks: response_mask must be a bool tensor [B, L], got {response_mask.dtype} "
            f"{tuple(response_mask.shape)}"
        )
    if (counts is None) == (probs is None):
        raise ValueError("sample_masks: pass exactly one of counts= (l-uniform) or probs= (t-Bernoulli)")
    level = counts if counts is not None else probs
    if level.dim() != 2 or level.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"sample_masks: {'counts' if counts is not None else 'probs'} must be [B, n] with "
            f"B={response_mask.shape[0]}, got {tuple(level.shape)}"
        )
    return level


def sample_masks_torch(
    response_mask: torch.Tensor,
    counts: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PyTorch mask sampler. Returns bool [B, n, L]; see :func:`sample_masks`."""
    level = _check_inputs(response_mask, counts, probs)
    B, L = response_mask.shape
    n = level.shape[1]
    resp = response_mask[:, None, :].expand(B, n, L)
    if probs is not None:
        u = torch.rand((B, n, L), generator=generator, device=response_mask.device)
        return (u < probs[..., None].to(u.dtype)) & resp
    # Exactly `count` positions: rank random keys among the row's response positions and keep the
    # `count` smallest. Ranking (not thresholding) keeps the count exact even when keys tie;
    # float64 keys make ties (and so any index preference) astronomically rare.
    keys = torch.rand((B, n, L), generator=generator, device=response_mask.device, dtype=torch.float64)
    keys = keys.masked_fill(~resp, 2.0)
    ranks = keys.argsort(dim=-1).argsort(dim=-1)
    return ranks < counts[..., None]


def sample_masks(
    response_mask: torch.Tensor,
    counts: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Draw masks over the response positions.

    Args:
        response_mask: bool [B, L]; True on the positions that may be masked.
        counts: int64 [B, n]; mask exactly this many response positions (1 <= count <= L_b).
        probs: float [B, n]; mask each response position independently with this probability.
        generator: source of randomness (the Triton path draws its Philox seed from it).
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`vrpo_kernels.dispatch`).

    Returns:
        bool [B, n, L], never True outside ``response_mask``.
    """
    impl = resolve_impl(impl, response_mask, "sample_masks", ("auto", "torch", "triton"))
    if impl == "triton":
        raise NotImplementedError("sample_masks: the Triton mask kernel has not landed yet")
    return sample_masks_torch(response_mask, counts, probs, generator)
