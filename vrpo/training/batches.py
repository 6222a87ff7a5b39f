"""Batches of preference pairs on the run's device, with their keyed noisy inputs (made on the device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estimator import NoisyDraw, SamplingPlan, noisy_draw
from ..models import collate
from .data import TokenizedPairs
from .schedule import CHOSEN, REJECTED, Item, draw_keys


@dataclass(frozen=True)
class Batches:
    """Collates pairs (chosen rows first, then rejected) and draws their masks.

    Attributes:
        pad_id: the padding token.
        device: where batches and draws go.
        seed: the run's seed, the first part of every draw key.
        mask_token_id: written at the masked positions of the noisy inputs.
        impl: the draw's implementation (``"auto"``, ``"torch"``, ``"triton"``: the same bits).
    """

    pad_id: int
    device: torch.device
    seed: int
    mask_token_id: int
    impl: str = "auto"

    def of(self, pairs: TokenizedPairs, items: list[Item]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``response_mask``, ``attention_mask`` [2B, L] of ``items`` = [(epoch, index)]."""
        seqs = [pairs.sequence(i, side) for side in (CHOSEN, REJECTED) for _, i in items]
        return {k: v.to(self.device) for k, v in collate(seqs, self.pad_id).items()}

    def draw(
        self, batch: dict, items: list[Item], plan: SamplingPlan, stream: str, seed: int | None = None
    ) -> NoisyDraw:
        """Noisy inputs and masks [2B, n, L] for ``batch``, made on its device from one key per sequence,
        ``(seed, stream, epoch, pair, side)`` (seed: the run's): only the keys cross from the host."""
        keys = torch.tensor(draw_keys(self.seed if seed is None else seed, stream, items), device=self.device)
        return noisy_draw(batch["input_ids"], batch["response_mask"], plan, keys, self.mask_token_id, self.impl)

    def draws(
        self,
        batch: dict,
        items: list[Item],
        plan: SamplingPlan,
        stream: str = "train",
        ref_stream: str = "ref",
        seed: int | None = None,
    ) -> tuple[NoisyDraw, NoisyDraw]:
        """The policy's draw and the reference's: the same one (antithetic sampling, LLaDA 1.5 Section 3) or
        an independent one."""
        draw = self.draw(batch, items, plan, stream, seed)
        return draw, draw if plan.antithetic else self.draw(batch, items, plan, ref_stream, seed)


def batch_terms(elbo, batch: dict, draw: NoisyDraw) -> torch.Tensor:
    """float32 [B, n] ELBO terms of ``batch``'s sequences on ``draw`` under ``elbo`` (an
    :class:`~vrpo.estimator.ELBOModule`, or one wrapped by accelerate): with gradients unless disabled."""
    return elbo(batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"])
