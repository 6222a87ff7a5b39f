"""vrpo: variance-reduced preference optimization for masked diffusion language models.

The core API::

    from vrpo import SamplingPlan, draw_masks, elbo_estimate, vrpo_loss

    plan = SamplingPlan(n_t=8, n_yt=1, estimator="l_uniform", antithetic=True)
    draw = draw_masks(response_mask, plan, generator=g)          # masks [B, n, L], weights [B, n]
    est = elbo_estimate(model, input_ids, response_mask, draw, mask_token_id=126336)   # [B]
    loss, metrics = vrpo_loss(pc, pr, rc, rr, beta=0.2)

A run: ``VRPOTrainer(VRPOConfig(model_name_or_path=..., dataset=...)).train()`` (or ``python -m vrpo.train``).

The packages, from the ground up (each imports only from those below it): ``vrpo_kernels`` (fused kernels),
:mod:`vrpo.estimator` (the maths), :mod:`vrpo.models` (LLaDA, Dream), :mod:`vrpo.training` (config, trainer),
:mod:`vrpo.tasks` (demo tasks), then the entry points ``vrpo.train`` and ``vrpo.plan``.
"""

from .errors import NonFiniteELBOError
from .estimator import (
    HeadOptions,
    MaskDraw,
    NoisyDraw,
    SamplingPlan,
    draw_masks,
    elbo_estimate,
    elbo_terms,
    exact_elbo,
    mdm_sft_loss,
    noisy_draw,
    vrpo_loss,
)
from .training import GRPOConfig, GRPOTrainer, VRPOConfig, VRPOTrainer, trainer_for

__version__ = "0.2.0"

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "HeadOptions",
    "MaskDraw",
    "NoisyDraw",
    "NonFiniteELBOError",
    "SamplingPlan",
    "VRPOConfig",
    "VRPOTrainer",
    "draw_masks",
    "elbo_estimate",
    "elbo_terms",
    "exact_elbo",
    "mdm_sft_loss",
    "noisy_draw",
    "trainer_for",
    "vrpo_loss",
]
