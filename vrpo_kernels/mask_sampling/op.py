"""The entry points, each with ``impl=``: :func:`sample_masks` and :func:`keyed_noisy_draw`."""

from __future__ import annotations

import torch

from ..dispatch import resolve_impl
from .common import KeyedDraw, _check_keyed_inputs
from .torch_path import _keyed_draw_torch, sample_masks_torch
from .triton_path import _keyed_draw_triton, sample_masks_triton


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
        counts: int [B, n]; mask exactly this many response positions (0 <= count <= L_b).
        probs: float [B, n]; mask each response position independently with this probability.
        generator: source of randomness (the Triton path draws its Philox seed from it).
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`vrpo_kernels.dispatch`).

    Returns:
        bool [B, n, L], never True outside ``response_mask``.
    """
    impl = resolve_impl(impl, response_mask, "sample_masks", ("auto", "torch", "triton"))
    if impl == "triton":
        return sample_masks_triton(response_mask, counts, probs, generator)
    return sample_masks_torch(response_mask, counts, probs, generator)


def keyed_noisy_draw(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    keys: torch.Tensor,
    plan,
    mask_token_id: int,
    impl: str = "auto",
    config: dict | None = None,
) -> KeyedDraw:
    """The keyed draw of the module docstring, fused with writing the noisy inputs.

    Args:
        input_ids: int64 [B, L].
        response_mask: bool [B, L]; True on the response tokens that may be masked; every row needs one.
        keys: int64 [B]; row ``b``'s 64-bit Philox key (its bits, so negative values are keys too).
        plan: anything with ``n_t``, ``n_yt``, ``estimator`` (``"l_uniform"`` or ``"t_bernoulli"``),
            ``stratified`` and ``t_floor`` (``vrpo``'s ``SamplingPlan``).
        mask_token_id: the id written where a token is masked.
        impl: ``"auto"`` (Triton on CUDA), ``"torch"`` or ``"triton"``: the same bits.
        config: Triton block size and launch settings (tests); None picks the device's.

    Returns:
        A :class:`KeyedDraw` on ``input_ids``' device: ids [B, n, L], masked [B, n, L], weight [B, n],
        levels [B, n_t].
    """
    lengths = _check_keyed_inputs(input_ids, response_mask, keys, plan, mask_token_id)
    impl = resolve_impl(impl, input_ids, "noisy_draw", ("auto", "torch", "triton"))
    if impl == "triton":
        return _keyed_draw_triton(input_ids, response_mask, keys, plan, mask_token_id, config)
    if input_ids.shape[0] == 0:  # nothing to draw (and no longest response to size the keys by)
        B, L, n, dev = 0, input_ids.shape[1], plan.n_t * plan.n_yt, input_ids.device
        return KeyedDraw(
            input_ids.new_empty((B, n, L)),
            torch.empty((B, n, L), dtype=torch.bool, device=dev),
            torch.empty((B, n), device=dev),
            torch.empty((B, plan.n_t), device=dev),
        )
    return _keyed_draw_torch(input_ids, response_mask, keys, lengths, plan, mask_token_id)
