"""The frozen reference's ELBO terms: from its own model, from the policy with its LoRA adapters off, or
precomputed for every pair a run will see (then the reference model is freed)."""

from __future__ import annotations

import gc

import torch
from tqdm.auto import tqdm

from ..estimator import ELBOModule, NoisyDraw
from .batches import batch_terms
from .schedule import Item


class Reference:
    """Reference terms on given draws.

    Args:
        accelerator: the run's.
        ref_elbo: the reference's ELBO module, or None with LoRA (the reference is then the policy with its
            adapters off) and when the loss never reads the reference (GRPO without a KL term).
        policy_module: the policy's (unwrapped) ELBO module, for LoRA.
    """

    def __init__(self, accelerator, ref_elbo: ELBOModule | None, policy_module: ELBOModule):
        self.accelerator = accelerator
        self.elbo = ref_elbo
        self.policy_module = policy_module
        self.cache: dict[Item, torch.Tensor] = {}

    def terms(self, batch: dict, items: list[Item], draw: NoisyDraw) -> tuple[torch.Tensor, bool]:
        """float32 [2B, n] reference terms on ``draw``, and whether the reference model ran (False when the
        terms were precomputed)."""
        cached = [self.cache.get(item) for item in items]
        if all(c is not None for c in cached):
            terms = torch.cat([torch.stack([c[0] for c in cached]), torch.stack([c[1] for c in cached])])
            return terms.to(self.accelerator.device), False
        # no_grad, not inference_mode: FSDP2 reuses its gathered-parameter buffers in the training forward.
        with torch.no_grad(), self.accelerator.autocast():
            if self.elbo is not None:
                terms = batch_terms(self.elbo, batch, draw)
            else:  # LoRA: the reference is the policy with its adapters off
                with self.policy_module.model.disable_adapter():
                    terms = batch_terms(self.policy_module, batch, draw)
        return terms.clone(), True  # clone: an ordinary tensor, usable next to autograd ones

    def precompute(self, todo: list[Item], size: int, batch_and_draw, show: bool):
        """Terms for every item of ``todo`` (``size`` pairs per forward; ``batch_and_draw(items) -> (batch,
        reference draw)``), then free the reference model."""
        for i in tqdm(range(0, len(todo), size), desc="reference ELBOs", disable=not show):
            items = todo[i : i + size]
            batch, draw = batch_and_draw(items)
            terms = self.terms(batch, items, draw)[0].cpu()
            for b, item in enumerate(items):
                self.cache[item] = torch.stack([terms[b], terms[len(items) + b]])
        self.elbo = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
