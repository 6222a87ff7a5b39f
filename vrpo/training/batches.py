"""Batches of preference pairs on the run's device, with their keyed mask draws."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estimator import MaskDraw, SamplingPlan, draw_masks_keyed
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
    """

    pad_id: int
    device: torch.device
    seed: int

    def of(self, pairs: TokenizedPairs, items: list[Item]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``response_mask``, ``attention_mask`` [2B, L] of ``items`` = [(epoch, index)]."""
        seqs = [pairs.sequence(i, side) for side in (CHOSEN, REJECTED) for _, i in items]
        return {k: v.to(self.device) for k, v in collate(seqs, self.pad_id).items()}

    def draw(self, batch: dict, items: list[Item], plan: SamplingPlan, stream: str, seed: int | None = None) -> MaskDraw:
        """Masks [2B, n, L] for ``batch``, keyed by ``(seed, stream, epoch, pair, side)`` (seed: the run's)."""
        keys = draw_keys(self.seed if seed is None else seed, stream, items)
        return draw_masks_keyed(batch["response_mask"], plan, keys)

    def draws(self, batch: dict, items: list[Item], plan: SamplingPlan, stream: str = "train", ref_stream: str = "ref",
              seed: int | None = None) -> tuple[MaskDraw, MaskDraw]:
        """The policy's draw and the reference's: the same one (antithetic sampling, LLaDA 1.5 Section 3) or
        an independent one."""
        draw = self.draw(batch, items, plan, stream, seed)
        return draw, draw if plan.antithetic else self.draw(batch, items, plan, ref_stream, seed)
