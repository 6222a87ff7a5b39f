"""The noisy inputs of the Monte Carlo ELBO, drawn on the device from one key per sequence.

A masked diffusion LM's log-likelihood is bounded below by an ELBO, an expectation over a noise level
and a random mask of the response (LLaDA 1.5, Zhu et al. 2025, Section 2, Eq. 2); VRPO estimates it
with ``n = n_t * n_yt`` masked copies of the sequence (``n_t`` levels, ``n_yt`` masks per level).
:func:`noisy_draw` makes all of them for a batch in one step (one Triton launch on a GPU): the
levels, the masks, the estimator weights and the noisy input ids with the mask token written in.

Every bit comes from Philox4x32-10 keyed by the sequence's own key and counted over its *response*
positions (the definition is written out in :mod:`vrpo_kernels.mask_sampling`), so a sequence gets the
same draw whatever batch, batch slot, padding side or amount, process count, device or resume point
it lands in, and the torch and Triton implementations agree bit for bit. Nothing but the keys
(``B`` int64) crosses from the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vrpo_kernels.mask_sampling import keyed_noisy_draw, philox4x32

from .sampling import MaskDraw, SamplingPlan


@dataclass(frozen=True)
class NoisyDraw(MaskDraw):
    """A :class:`~vrpo.estimator.MaskDraw` (``masked`` bool [B, n, L], ``weight`` float32 [B, n], ``levels``
    float32 [B, n_t], ``plan``; samples timestep-major) that also holds the noisy inputs, on the batch's device.

    Attributes:
        input_ids: int64 [B, n, L]; the row's ids with the mask token where ``masked``.
    """

    input_ids: torch.Tensor


def _keys_tensor(keys: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 [B] keys on ``device``; a sequence of ints (e.g. ``draw_key`` values) is converted."""
    if isinstance(keys, torch.Tensor):
        return keys
    values = list(keys)
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or not -(2**63) <= k < 2**63]
    if bad:
        raise ValueError(f"noisy_draw: keys must be 64-bit integers, got {bad[0]!r}")
    return torch.tensor(values, dtype=torch.int64, device=device)


def noisy_draw(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    plan: SamplingPlan,
    keys: torch.Tensor | Sequence[int],
    mask_token_id: int,
    impl: str = "auto",
) -> NoisyDraw:
    """Draw ``plan.n`` noisy copies of every row, row ``b``'s from ``keys[b]`` and its response alone.

    Args:
        input_ids: int64 [B, L].
        response_mask: bool [B, L]; True on the response tokens that may be masked (prompt, padding
            and padded EOS False). Every row needs at least one True.
        plan: the sampling plan (its ``antithetic`` flag is the caller's: pass the same draw to the
            policy and the reference).
        keys: int64 [B] on ``input_ids``' device, or B ints; one 64-bit Philox key per row (e.g.
            ``vrpo.estimator.draw_key(seed, stream, epoch, pair, side)``).
        mask_token_id: the id written at the masked positions.
        impl: ``"auto"`` (Triton on CUDA, else torch), ``"torch"`` or ``"triton"``: the same bits.

    Returns:
        A :class:`NoisyDraw` on ``input_ids``' device.
    """
    if not isinstance(plan, SamplingPlan):
        raise ValueError(f"noisy_draw: plan must be a SamplingPlan, got {type(plan).__name__}")
    draw = keyed_noisy_draw(
        input_ids, response_mask, _keys_tensor(keys, input_ids.device), plan, mask_token_id, impl=impl
    )
    return NoisyDraw(masked=draw.masked, weight=draw.weight, levels=draw.levels, plan=plan, input_ids=draw.input_ids)


D1_PROMPT_MASK = 0.15  # d1's prompt masking probability (Zhao et al. 2025, Section 3.2)
_D1_STREAM = 0x6431  # the Philox counter word that keeps these bits apart from noisy_draw's


def one_step_draw(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    keys: Sequence[int],
    mask_token_id: int,
    prompt_mask_prob: float = D1_PROMPT_MASK,
) -> NoisyDraw:
    """d1's one-step log-likelihood estimate as a draw (d1/diffu-GRPO, Zhao et al. 2025, Section 3.2): one
    sample per row with the whole response masked and each prompt token masked with probability
    ``prompt_mask_prob``, weight 1, so that :func:`~vrpo.estimator.elbo_terms` returns
    ``sum_i log p(y_i | masked response, noisy prompt)``. That is not an ELBO (no level is drawn): it estimates
    another quantity than ``log pi(y|x)``, and is here to compare against (``--likelihood one_step``). Only the
    estimate is d1's: the trainer keys it per completion, so the rollout and current policies see the same
    prompt mask (d1 draws a new one at each inner iteration), and the ratio is per sequence, not per token.

    Args:
        input_ids, response_mask, attention_mask: [B, L] (int64, bool, 0/1); prompt tokens are the attended
            non-response ones.
        keys: B ints; prompt token ``k`` of row ``b`` is masked when the first Philox4x32-10 word of counter
            ``(k, stream, 0, 0)`` under ``keys[b]`` is below ``prompt_mask_prob * 2^32``: counted over the
            prompt's own tokens, so a row gets the same mask whatever its batch, padding or device.
        mask_token_id: the id written at the masked positions.
        prompt_mask_prob: in [0, 1).

    Returns:
        A :class:`NoisyDraw` with ``n = 1`` (plan ``SamplingPlan(n_t=1)``), ``levels`` 1 (all masked).
    """
    if not 0.0 <= prompt_mask_prob < 1.0:
        raise ValueError(f"one_step_draw: prompt_mask_prob must be in [0, 1), got {prompt_mask_prob!r}")
    B = input_ids.shape[0]
    device = input_ids.device
    keys = _keys_tensor(keys, device)
    if keys.shape != (B,):
        raise ValueError(f"one_step_draw: {keys.numel()} keys for {B} rows")
    prompt = attention_mask.bool() & ~response_mask
    index = (prompt.long().cumsum(-1) - 1).clamp(min=0)
    counter = torch.stack(
        [index, torch.full_like(index, _D1_STREAM), torch.zeros_like(index), torch.zeros_like(index)], -1
    )
    key_words = torch.stack([keys & 0xFFFFFFFF, (keys >> 32) & 0xFFFFFFFF], -1)[:, None, :]
    word = philox4x32(counter, key_words)[..., 0]
    masked_prompt = prompt & (word < int(prompt_mask_prob * 2**32))
    noisy = torch.where(response_mask | masked_prompt, torch.as_tensor(mask_token_id, device=device), input_ids)
    ones = torch.ones(B, 1, dtype=torch.float32, device=device)
    # ``masked`` marks the scored tokens (the response); the prompt's masks live in ``input_ids`` alone.
    return NoisyDraw(
        masked=response_mask[:, None, :].clone(),
        weight=ones,
        levels=ones.clone(),
        plan=SamplingPlan(n_t=1),
        input_ids=noisy[:, None, :],
    )
