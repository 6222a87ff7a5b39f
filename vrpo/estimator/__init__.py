"""The estimator: the paper's maths on tensors. Mask plans and draws (:mod:`.sampling`), the Monte Carlo
ELBO of a masked diffusion LM (:mod:`.elbo`, packed rows in :mod:`.packing`) and the losses built on it
(:mod:`.losses`), and the online-RL objective on it (:mod:`.policy_gradient`). It imports only the kernels below it; models plug in as callables."""  # noqa: E501

from .elbo import (
    ELBOModule,
    HeadOptions,
    elbo_estimate,
    elbo_terms,
    exact_elbo,
    fusable_head,
    masked_token_logprobs,
    model_logit_shift,
    noisy_inputs,
    packed_elbo_terms,
    unwrap,
)
from .losses import LOSS_TYPES, mdm_sft_loss, reward_margin, vrpo_loss
from .noise import D1_PROMPT_MASK, NoisyDraw, noisy_draw, one_step_draw
from .policy_gradient import (
    LIKELIHOODS,
    SCALE_REWARDS,
    clipped_objective,
    group_advantages,
    grpo_loss,
    k3_kl,
    sample_log_ratios,
)
from .sampling import (
    ESTIMATORS,
    MaskDraw,
    SamplingPlan,
    draw_key,
    draw_levels,
    draw_masks,
)

__all__ = [
    "D1_PROMPT_MASK",
    "ESTIMATORS",
    "ELBOModule",
    "HeadOptions",
    "LIKELIHOODS",
    "LOSS_TYPES",
    "MaskDraw",
    "NoisyDraw",
    "SCALE_REWARDS",
    "SamplingPlan",
    "clipped_objective",
    "draw_key",
    "draw_levels",
    "draw_masks",
    "elbo_estimate",
    "elbo_terms",
    "exact_elbo",
    "fusable_head",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "masked_token_logprobs",
    "mdm_sft_loss",
    "model_logit_shift",
    "noisy_draw",
    "noisy_inputs",
    "one_step_draw",
    "packed_elbo_terms",
    "reward_margin",
    "sample_log_ratios",
    "unwrap",
    "vrpo_loss",
]
