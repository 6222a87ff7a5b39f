"""The VRPO objective: DPO with ELBO estimates in place of exact log-likelihoods.

With ``r(y) = B_pi(y) - B_ref(y)`` (an implicit reward up to ``beta``), the score is
``s = beta * (r(y_w) - r(y_l))`` and the default loss is ``-log sigmoid(s)``. The paper bounds the
bias and variance of the loss and of its gradient by ``Var[s_hat]``; :func:`vrpo_loss` reports an
estimate of it as ``score/var`` so that runs can watch it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def reward_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """``(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))`` from ELBO estimates [B]: the score without
    ``beta``, DPO's log-ratio margin with ELBOs in place of log-likelihoods (Zhu et al. 2025)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _as_samples(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 1:
        return x[:, None]
    if x.dim() == 2:
        return x
    raise ValueError(
        f"vrpo_loss: {name} must be [B] (ELBO estimates) or [B, n] (per-sample terms), got {tuple(x.shape)}"
    )


def preference_loss(logits: torch.Tensor, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """Per-pair loss from the (unscaled) log-ratio margin ``logits`` [B]. float [B]."""
    s = beta * logits
    if loss_type == "sigmoid":
        return -F.logsigmoid(s) * (1 - label_smoothing) - F.logsigmoid(-s) * label_smoothing
    if loss_type == "robust":
        return (-F.logsigmoid(s) * (1 - label_smoothing) + F.logsigmoid(-s) * label_smoothing) / (
            1 - 2 * label_smoothing
        )
    if loss_type == "hinge":
        return torch.relu(1 - s)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"vrpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def vrpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.2,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VRPO loss of a batch of preference pairs, averaged over the batch.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: float [B] ELBO estimates, or
            float [B, n] per-sample terms (their mean over ``n`` is the estimate). With per-sample
            terms the metrics include ``score/var``. Samples must be independent across ``n`` for that
            estimate to be unbiased (pass per-timestep means when ``n_yt > 1``); stratified samples
            make it conservative. Reference inputs are detached: gradients reach policy terms only.
        beta: the KL strength (the paper: 0.2).
        loss_type: ``"sigmoid"`` (DPO), ``"ipo"``, ``"hinge"`` or ``"robust"``.
        label_smoothing: for ``"sigmoid"`` (cDPO) and ``"robust"``; in [0, 0.5).

    Returns:
        ``(loss, metrics)``: a scalar tensor, and detached scalar tensors under TRL's names
        (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
        ``logps/chosen``, ``logps/rejected``) plus ``score/mean`` and ``score/var`` (NaN when n = 1:
        one sample cannot estimate a variance).
    """
    if beta <= 0:
        raise ValueError(f"vrpo_loss: beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"vrpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"vrpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc = _as_samples(policy_chosen, "policy_chosen")
    pr = _as_samples(policy_rejected, "policy_rejected")
    rc = _as_samples(ref_chosen, "ref_chosen").detach()
    rr = _as_samples(ref_rejected, "ref_rejected").detach()
    shapes = {tuple(t.shape) for t in (pc, pr, rc, rr)}
    if len(shapes) != 1:
        raise ValueError(f"vrpo_loss: the four inputs must have the same shape, got {sorted(shapes)}")

    chosen_ratio = (pc - rc).mean(-1)
    rejected_ratio = (pr - rr).mean(-1)
    logits = chosen_ratio - rejected_ratio
    losses = preference_loss(logits, beta, loss_type, label_smoothing)

    with torch.no_grad():
        sample_scores = beta * ((pc - rc) - (pr - rr))  # [B, n]
        n = sample_scores.shape[1]
        score_var = (
            (sample_scores.var(-1, unbiased=True) / n).mean()
            if n > 1
            else torch.tensor(float("nan"), device=logits.device)
        )
        chosen_rewards = beta * chosen_ratio.detach()
        rejected_rewards = beta * rejected_ratio.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": pc.detach().mean(-1).mean(),
            "logps/rejected": pr.detach().mean(-1).mean(),
            "score/mean": (beta * logits.detach()).mean(),
            "score/var": score_var,
        }
    return losses.mean(), metrics


def mdm_sft_loss(policy_chosen: torch.Tensor, response_lengths: torch.Tensor) -> torch.Tensor:
    """The masked-diffusion SFT loss on the chosen responses, from their ELBO estimates.

    ``mean_b(-B_hat[b] / L_b)``: LLaDA's SFT objective (the negative ELBO per response token). It
    reuses the policy's chosen-response estimates, so it costs no extra forward pass. The paper adds
    it with weight 0.05.

    Args:
        policy_chosen: float [B] estimates or [B, n] per-sample terms.
        response_lengths: [B], response tokens per row.
    """
    est = policy_chosen.mean(-1) if policy_chosen.dim() == 2 else policy_chosen
    return (-est / response_lengths.to(est.dtype)).mean()
