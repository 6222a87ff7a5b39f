"""Online RL on ELBO estimates: group-relative advantages and the clipped ELBO-ratio objective (GRPO).

GRPO (Shao et al. 2024, "DeepSeekMath", Section 4.1, Eq. 3) samples ``G`` completions per prompt from the
rollout policy ``pi_old``, scores them, and maximises the PPO-clipped surrogate with group-normalised
advantages ``A_i = (r_i - mean(r)) / std(r)``. Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
Training", Section 3.1) drops the std division (and any per-length normalisation), which biases towards
neither easy/hard groups nor short/long answers.

A masked diffusion LM has no tractable ``log pi(y|x)``. d1 / diffu-GRPO (Zhao et al. 2025, Section 3.2)
replaces it by a one-step estimate (the whole response masked, the prompt randomly masked); here it is the
ELBO ``B(y|x)`` estimated as in LLaDA 1.5 (Zhu et al. 2025, Section 3): ``n_t`` stratified levels, one mask
per level, and the **same** masks for the current and the rollout policy (and the reference), so that most
of the Monte Carlo noise cancels in the sequence-level log-ratio

    log_ratio = mean_j (term_new[j] - term_old[j])  ~  B_new(y|x) - B_old(y|x),   ratio = exp(log_ratio).

Per completion the objective is ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` (PPO's), averaged
over completions (a constant normaliser, as Dr. GRPO asks; the ELBO is a sum over the response tokens, so
no per-length division), minus ``beta * KL`` where the KL to the reference is the k3 estimate
``exp(d) - d - 1`` of ``d = B_ref - B_new`` on the same masks (Schulman 2020; DeepSeekMath Eq. 4, at the
sequence level).

How the estimator's variance enters the gradient (the ELBO's noise in ``grad B_new_hat``, the log-ratio's in
the ratio and the clip): docs/online_rl.md. With ``num_iterations = 1`` the log-ratio is exactly 0.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "none")
LIKELIHOODS = ("elbo", "one_step")  # the estimate of log pi(y|x) in the ratio: ours, or d1's (for ablations)


def group_advantages(
    rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of ``G`` completions per prompt.

    Args:
        rewards: float [P, G], the rewards of prompt ``p``'s ``G`` completions.
        scale: ``"group"`` divides by the group's standard deviation (GRPO, DeepSeekMath Eq. 3, with
            ``eps`` added as TRL does); ``"none"`` does not (Dr. GRPO).

    Returns:
        ``(advantages float [P, G], zero_std bool [P])``: ``zero_std`` marks groups whose rewards are all
        equal; their advantages are exactly 0, so they contribute no gradient.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [P, G] with G >= 2, got {tuple(rewards.shape)}")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"group_advantages: scale must be one of {SCALE_REWARDS}, got {scale!r}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    zero_std = (rewards == rewards[:, :1]).all(-1)
    # Exactly 0 for equal rewards (the mean of equal floats can round off them).
    centred = torch.where(zero_std[:, None], torch.zeros_like(centred), centred)
    if scale == "group":
        centred = centred / (rewards.std(-1, keepdim=True) + eps)
    return centred, zero_std


def sample_log_ratios(new_terms: torch.Tensor, old_terms: torch.Tensor) -> torch.Tensor:
    """float [B, n]: per-sample differences of two models' ELBO terms on the same masks; their mean over
    ``n`` is the estimated sequence log-ratio ``B_new - B_old`` (``old_terms`` is detached)."""
    if new_terms.shape != old_terms.shape or new_terms.dim() != 2:
        raise ValueError(
            f"sample_log_ratios: terms must both be [B, n], got {tuple(new_terms.shape)} and {tuple(old_terms.shape)}"
        )
    return new_terms - old_terms.detach()


def k3_kl(log_ratio_ref: torch.Tensor) -> torch.Tensor:
    """The k3 estimate ``exp(d) - d - 1`` (>= 0) of ``KL(pi || ref)`` from ``d = log ref - log pi`` [B]."""
    return torch.expm1(log_ratio_ref) - log_ratio_ref


def clipped_objective(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per completion (to maximise), and where the clip is active.

    Args:
        log_ratio: float [B], estimated ``log pi / pi_old`` per completion (with gradients).
        advantages: float [B].
        epsilon: the clip range, ``ratio`` in ``[1 - epsilon, 1 + epsilon]``.

    Returns:
        ``(objective float [B], clipped bool [B])``; ``clipped`` marks completions whose gradient the clip
        removed (the clipped branch is the smaller one).
    """
    if not epsilon > 0:
        raise ValueError(f"clipped_objective: epsilon must be > 0, got {epsilon}")
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped_value = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages
    clipped = (clipped_value < unclipped).detach()
    return torch.minimum(unclipped, clipped_value), clipped


def grpo_loss(
    new_terms: torch.Tensor,
    old_terms: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    ref_terms: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of a batch of completions from ELBO terms on shared masks (see the module docstring).

    Args:
        new_terms: float [B, n_t] current-policy terms, with gradients (per level: average the ``n_yt``
            masks of a level first, so that the samples are independent for ``score/var``).
        old_terms: float [B, n_t] rollout-policy terms on the same masks (pass ``new_terms.detach()`` when
            the rollout policy is the current one).
        advantages: float [B].
        epsilon: PPO's clip range.
        ref_terms: float [B, n_t] reference terms on the same masks, needed when ``beta > 0``.
        beta: weight of the KL-to-reference term.

    Returns:
        ``(loss, metrics)``: the scalar loss (the negated mean objective plus ``beta * kl``) and detached
        scalars: ``clip_ratio``, ``kl`` (when computed), ``score/mean`` and ``score/var`` (the estimated
        log-ratio's mean and the variance of its estimate, ``var_j / n``), ``elbo/var`` (the variance of the
        policy's ELBO estimate, the noise of ``grad B_hat``).
    """
    samples = sample_log_ratios(new_terms, old_terms)
    if advantages.shape != samples.shape[:1]:
        raise ValueError(f"grpo_loss: advantages must be [B] = [{samples.shape[0]}], got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0, got {beta}")
    log_ratio = samples.mean(-1)
    objective, clipped = clipped_objective(log_ratio, advantages.detach(), epsilon)
    loss = -objective.mean()
    n = samples.shape[1]
    with torch.no_grad():
        nan = torch.tensor(float("nan"), device=samples.device)
        metrics = {
            "clip_ratio": clipped.float().mean(),
            "score/mean": log_ratio.detach().mean(),
            "score/var": (samples.detach().var(-1) / n).mean() if n > 1 else nan,
            "elbo/var": (new_terms.detach().var(-1) / n).mean() if n > 1 else nan,
        }
    if beta > 0:
        if ref_terms is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_terms")
        kl = k3_kl(-sample_log_ratios(new_terms, ref_terms).mean(-1))
        loss = loss + beta * kl.mean()
        metrics["kl"] = kl.detach().mean()
    return loss, metrics
