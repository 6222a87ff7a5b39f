"""What the paths share: the input checks of both ops, the Philox constants, the keyed draw's outputs
(:class:`KeyedDraw`) and t-Bernoulli's rounded floor constants."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    if counts is not None:
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError(f"sample_masks: counts must be an integer tensor, got {counts.dtype}")
        lengths = response_mask.sum(-1, keepdim=True)
        bad = (counts < 0) | (counts > lengths)
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"sample_masks: counts[{b}, {j}] = {int(counts[b, j])} is outside [0, {int(lengths[b, 0])}] "
                f"(row {b} has {int(lengths[b, 0])} response positions)"
            )
    else:
        if not probs.dtype.is_floating_point:
            raise ValueError(f"sample_masks: probs must be a float tensor, got {probs.dtype}")
        if ((probs < 0) | (probs > 1) | probs.isnan()).any():
            raise ValueError("sample_masks: probs must lie in [0, 1]")
    return level


# --------------------------------------------------------------------------------------------------
# Keyed draw: Philox4x32-10 in torch (int64 emulation of uint32) and in one Triton kernel
# --------------------------------------------------------------------------------------------------

PHILOX_ROUNDS = 10
# Philox4x32's round multipliers and key increments (Salmon et al. 2011, Section 5; Random123's
# PHILOX_M4x32_0/1 and PHILOX_W32_0/1: the golden ratio and sqrt(3) - 1 in 0.32 fixed point).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF
_TAG_POSITION, _TAG_LEVEL = 0, 1  # counter word c2 (see the module docstring)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class KeyedDraw:
    """The fused draw's outputs, all on the inputs' device.

    Attributes:
        input_ids: int64 [B, n, L]; the mask token where ``masked``, else the input token.
        masked: bool [B, n, L]; True on the masked response positions.
        weight: float32 [B, n]; the estimator weight of each sample.
        levels: float32 [B, n_t]; the mask count ``l`` (l-uniform) or probability ``p`` (t-Bernoulli).
    """

    input_ids: torch.Tensor
    masked: torch.Tensor
    weight: torch.Tensor
    levels: torch.Tensor


def _floor_words(t_floor: float) -> tuple[float, float]:
    """``(fl32(1 - t_floor), fl32(t_floor))``: t-Bernoulli's ``p = c * t + e`` constants, rounded once."""
    c = torch.tensor(1.0 - t_floor, dtype=torch.float32).item()
    e = torch.tensor(t_floor, dtype=torch.float32).item()
    return c, e


def _check_keyed_inputs(input_ids, response_mask, keys, plan, mask_token_id) -> torch.Tensor:
    """Validate the keyed draw's arguments; returns the rows' response lengths (int64 [B])."""
    if input_ids.dtype != torch.int64 or input_ids.dim() != 2:
        raise ValueError(
            f"noisy_draw: input_ids must be an int64 tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if response_mask.dtype != torch.bool or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"noisy_draw: response_mask must be a bool tensor of input_ids' shape "
            f"{tuple(input_ids.shape)}, got {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    if keys.dtype != torch.int64 or keys.shape != input_ids.shape[:1]:
        raise ValueError(
            f"noisy_draw: keys must be an int64 tensor [B] with B={input_ids.shape[0]}, got "
            f"{keys.dtype} {tuple(keys.shape)}"
        )
    if response_mask.device != input_ids.device or keys.device != input_ids.device:
        raise ValueError(
            f"noisy_draw: response_mask ({response_mask.device}) and keys ({keys.device}) must be "
            f"on input_ids' device ({input_ids.device})"
        )
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < 2**31:
        raise ValueError(f"noisy_draw: mask_token_id must be an int in [0, 2^31), got {mask_token_id!r}")
    if input_ids.shape[1] >= 2**31:
        raise ValueError(f"noisy_draw: rows of {input_ids.shape[1]} tokens are past the 2^31 the counters hold")
    lengths = response_mask.sum(-1)
    empty = (lengths == 0).nonzero()
    if empty.numel():
        rows = empty[:, 0].tolist()
        raise ValueError(
            f"noisy_draw: response_mask row {rows[0]} has no response tokens (empty rows: "
            f"{rows[:10]}); every sequence needs at least one to estimate its ELBO"
        )
    return lengths
