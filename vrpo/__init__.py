"""vrpo: variance-reduced preference optimization for masked diffusion language models.

The core API::

    from vrpo import SamplingPlan, draw_masks, elbo_estimate, vrpo_loss

    plan = SamplingPlan(n_t=8, n_yt=1, estimator="l_uniform", antithetic=True)
    draw = draw_masks(response_mask, plan, generator=g)          # masks [B, n, L], weights [B, n]
    est = elbo_estimate(model, input_ids, response_mask, draw, mask_token_id=126336)   # [B]
    loss, metrics = vrpo_loss(pc, pr, rc, rr, beta=0.2)
"""

from .elbo import NonFiniteELBOError, elbo_estimate, elbo_terms, exact_elbo
from .losses import mdm_sft_loss, vrpo_loss
from .sampling import MaskDraw, SamplingPlan, draw_masks

__version__ = "0.1.0"

__all__ = [
    "MaskDraw",
    "NonFiniteELBOError",
    "SamplingPlan",
    "draw_masks",
    "elbo_estimate",
    "elbo_terms",
    "exact_elbo",
    "mdm_sft_loss",
    "vrpo_loss",
]
