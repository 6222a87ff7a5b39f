"""The budget advisor: where should a fixed number of forward passes go, to masks (n_t) or to pairs?

VRPO spends ``n = n_t * n_yt`` masked forward passes per sequence (LLaDA 1.5, Zhu et al. 2025, Section 3.2).
At a fixed compute per step, ``N = B * n`` forward passes buy either more masks per pair or more pairs. The
score estimate of pair ``i`` from its ``n_t`` independent timestep samples ``s_ij`` (each the per-sample
``beta * ((B_pi - B_ref)(y_w) - (B_pi - B_ref)(y_l))`` with the policy and the reference on the same masks, so
the antithetic pairing lives inside one term; with ``n_yt > 1`` a sample is the mean of a timestep's masks) is
``s_hat_i = mean_j s_ij``, and the minibatch mean is ``m = mean_i s_hat_i``. By the law of total variance,

    Var(m) = (sigma_pair^2 + sigma_mask^2 / n_t) / B,

with ``sigma_mask^2 = E_i[Var(s_ij | pair i)]`` (the mask part, one sample) and ``sigma_pair^2 =
Var_i(E[s_ij | pair i])`` (the pair part). :func:`variance_parts` estimates both without bias from one
minibatch; :func:`advise` predicts ``Var(m)`` for each ``n_t`` at the same ``N``: with ``B' = N / (n_t n_yt)``
pairs, ``Var(m) = (sigma_pair^2 + sigma_mask^2 / n_t) * n_t * n_yt / N``. That is ``(n_t sigma_pair^2 +
sigma_mask^2) n_yt / N``: it grows with ``n_t`` whenever ``sigma_pair^2 > 0`` (a new pair also brings a fresh
mask), so for the minibatch score's noise alone the fewest masks per pair always win.

The noise is not all that ``n_t`` buys. The loss ``-log sigmoid(s_hat_i)`` is convex, so a noisy score biases
its *value* upward by about ``sigma_mask^2 / (8 n_t)`` per pair, which more pairs do not average away (the
paper's Theorem 1 bounds it by the score's standard deviation). :func:`predicted_loss_error` adds that bias,
squared, to the loss's variance (both at ``s = 0``: the delta method, slope 1/2, and ``E[softplus(e)] - log 2``
for a Gaussian error, by quadrature). It is not the default criterion: at ``s = 0`` the loss's third
derivative vanishes, so the bias of its *gradient* comes only from how the mask variance itself changes with
the weights, which the value's bias does not measure; and on the sorting demo (``benchmarks/budget.py``,
3 seeds, 300 steps) the loss-error criterion advised n_t = 4 with 990 pairs and n_t = 8 with 128, which scored
6.6 and 9.6 points of exact-sort accuracy under n_t = 1, while the noise criterion advised n_t = 1 in both (in
the best group both times). So :func:`advise` minimises the score noise by default (``criterion="noise"``);
``criterion="loss_error"`` is there for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

N_T_CHOICES = (1, 2, 4, 8, 16)  # the n_t the advisor compares
# What the advice minimises: "noise", the minibatch score's variance (what runs log), or "loss_error", the
# loss's variance plus its squared bias (see the module docstring for why it is not the default).
CRITERIA = ("noise", "loss_error")
# Gauss-Hermite nodes and weights (probabilists'), for E[f(e)] with e Gaussian: 40 nodes agree with 10^6-sample
# averages to within their standard error for variances up to 44 (tests/estimator/test_advisor.py).
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(40)


def sample_scores(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """float [B, n_t] per-sample scores ``beta * ((pc - rc) - (pr - rr))`` (detached) from per-sample (grouped)
    ELBO terms [B, n_t]: the terms whose mean over ``n_t`` is the score :func:`~vrpo.estimator.vrpo_loss` uses."""
    with torch.no_grad():
        return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)).float()


@dataclass(frozen=True)
class VarianceParts:
    """The two parts of the score's variance, from one minibatch.

    Attributes:
        mask: ``sigma_mask^2``, the mean over pairs of the variance of one sample given its pair.
        pairs: ``sigma_pair^2``, the variance over pairs of the expected score of a pair (clamped at 0).
        pairs_raw: the unclamped estimate (negative when sampling noise exceeds the pair part).
        n_t: samples per pair the estimate came from.
    """

    mask: float
    pairs: float
    pairs_raw: float
    n_t: int

    def mask_of_mean(self) -> float:
        """``sigma_mask^2 / n_t``: the mask part of the variance of one pair's score estimate (``score/var_mask``)."""
        return self.mask / self.n_t


def variance_parts(scores: torch.Tensor) -> VarianceParts:
    """Unbiased estimates of the mask and pair parts of the score's variance.

    Args:
        scores: float [B, n] per-sample scores (:func:`sample_scores`), B >= 2 pairs, n >= 2 independent samples
            each (given the pair).

    The mask part: each pair's sample variance (ddof = 1) is unbiased for its ``Var(s | pair)``, so their mean
    over pairs is unbiased for ``sigma_mask^2``. The pair part: the pair means ``s_hat_i`` are i.i.d. with
    variance ``sigma_pair^2 + sigma_mask^2 / n`` (total variance), so their sample variance over pairs
    (ddof = 1) is unbiased for that sum; subtracting the unbiased ``sigma_mask^2 / n`` leaves an unbiased
    ``sigma_pair^2``. The difference can come out negative by sampling noise; ``pairs`` clamps it at 0 (a
    variance is never negative; clamping biases it up by at most the negative part's mean), ``pairs_raw`` keeps
    it for averaging over steps (average the raw values, then clamp, to stay unbiased). Stratified timesteps
    make the samples negatively correlated: the within-pair variance then overstates the mask part (a
    conservative ``score/var``) and understates the pair part.
    """
    if scores.dim() != 2:
        raise ValueError(f"variance_parts: scores must be [B, n], got {tuple(scores.shape)}")
    B, n = scores.shape
    if B < 2 or n < 2:
        raise ValueError(f"variance_parts: need at least 2 pairs and 2 samples per pair, got B={B}, n={n}")
    x = scores.detach().double()
    mask = float(x.var(-1, unbiased=True).mean())
    pairs_raw = float(x.mean(-1).var(unbiased=True)) - mask / n
    return VarianceParts(mask=mask, pairs=max(pairs_raw, 0.0), pairs_raw=pairs_raw, n_t=n)


def predicted_noise(mask: float, pairs: float, forward_passes: float, n_t: int, n_yt: int = 1) -> float:
    """Predicted variance of the minibatch-mean score with ``n_t`` timesteps (``n_yt`` masks each) per pair and
    ``forward_passes / (n_t n_yt)`` pairs: ``(pairs + mask / n_t) n_t n_yt / forward_passes``.

    ``mask`` is the variance of one sample (one timestep's ``n_yt`` masks averaged) given its pair."""
    if forward_passes <= 0 or n_t < 1 or n_yt < 1:
        raise ValueError(
            f"predicted_noise: need forward_passes > 0 and n_t, n_yt >= 1, got {forward_passes}, {n_t}, {n_yt}"
        )
    return (pairs + mask / n_t) * n_t * n_yt / forward_passes


def predicted_bias(mask: float, n_t: int) -> float:
    """Upward bias of one pair's loss ``-log sigmoid(s_hat)`` at ``s = 0`` when ``s_hat``'s error is Gaussian
    with variance ``mask / n_t``: ``E[softplus(e)] - log 2`` (``~ mask / (8 n_t)`` for small variances, at
    most ``sqrt(mask / n_t)``, the paper's Theorem 1 bound)."""
    sd = math.sqrt(mask / n_t)
    mean = float((_GH_WEIGHTS * np.logaddexp(0.0, sd * _GH_NODES)).sum()) / math.sqrt(2 * math.pi)
    return max(mean - math.log(2.0), 0.0)


def predicted_loss_error(mask: float, pairs: float, forward_passes: float, n_t: int, n_yt: int = 1) -> float:
    """Predicted mean squared error of the minibatch-mean loss at ``s = 0``: its variance (the loss's slope is
    1/2 there: ``predicted_noise / 4``) plus its squared bias (:func:`predicted_bias`)."""
    return predicted_noise(mask, pairs, forward_passes, n_t, n_yt) / 4 + predicted_bias(mask, n_t) ** 2


@dataclass(frozen=True)
class Advice:
    """The advised ``n_t`` at a budget, and the predictions for every candidate.

    Attributes:
        n_t, batch: the advised timesteps per pair and pairs per step.
        current_n_t, current_batch: the run's.
        noise: ``{n_t: predicted Var(minibatch-mean score)}`` for each candidate that divides the budget.
        error: ``{n_t: predicted loss error}`` (:func:`predicted_loss_error`).
        criterion: what the advice minimises, one of :data:`CRITERIA`.
        forward_passes: the budget, masked forward passes per sequence side per step (batch x n_t x n_yt).
    """

    n_t: int
    batch: int
    current_n_t: int
    current_batch: int
    noise: dict[int, float]
    error: dict[int, float]
    forward_passes: int
    criterion: str = "noise"

    def _scores(self) -> dict[int, float]:
        return self.noise if self.criterion == "noise" else self.error

    def _what(self) -> str:
        return "score noise" if self.criterion == "noise" else "predicted loss error (score noise and ELBO bias)"

    def gain(self) -> float:
        """How many times less noise (or loss error) the advice has than the run's own ``n_t`` (1.0: the run is
        the advice)."""
        scores = self._scores()
        return 1.0 if self.n_t == self.current_n_t else scores[self.current_n_t] / scores[self.n_t]

    def sentence(self) -> str:
        """The closing summary's line."""
        if self.n_t == self.current_n_t:
            return (
                f"at this budget ({self.forward_passes} forward passes per step), the run's n_t = {self.n_t} with "
                f"batch {self.batch} has the least {self._what()} of n_t in {sorted(self.noise)}"
            )
        return (
            f"at this budget ({self.forward_passes} forward passes per step), n_t = {self.n_t} with batch "
            f"{self.batch} gives {self.gain():.1f}x less {self._what()} than n_t = {self.current_n_t} with batch "
            f"{self.current_batch} (the run's)"
        )


def advise(
    parts: VarianceParts | tuple[float, float],
    batch: int,
    n_t: int,
    n_yt: int = 1,
    choices=N_T_CHOICES,
    criterion: str = "noise",
) -> Advice:
    """The ``n_t`` of least predicted minibatch score noise (``criterion="noise"``) or loss error
    (``"loss_error"``, :func:`predicted_loss_error`) at the run's forward passes per step.

    Args:
        parts: :class:`VarianceParts`, or ``(mask, pairs)`` (e.g. means over a log window).
        batch, n_t, n_yt: the run's global batch (pairs per optimizer step) and allocation.
        choices: candidate ``n_t``; those whose batch ``batch * n_t / candidate`` is not a whole number are left
            out, and the run's own ``n_t`` is always one.

    Ties (by noise, every ``n_t`` when the pair part is 0; by either, when both parts are 0, as at the first
    step, where policy = reference) keep the run's ``n_t``: no evidence for a change."""
    if criterion not in CRITERIA:
        raise ValueError(f"advise: criterion must be one of {CRITERIA}, got {criterion!r}")
    mask, pairs = (parts.mask, parts.pairs) if isinstance(parts, VarianceParts) else parts
    if not (mask >= 0 and pairs >= 0):
        raise ValueError(f"advise: variances must be >= 0, got mask={mask}, pairs={pairs}")
    budget = batch * n_t * n_yt
    candidates = sorted({c for c in choices if (batch * n_t) % c == 0} | {n_t})
    noise = {c: predicted_noise(mask, pairs, budget, c, n_yt) for c in candidates}
    error = {c: predicted_loss_error(mask, pairs, budget, c, n_yt) for c in candidates}
    scores = noise if criterion == "noise" else error
    least = min(scores.values())
    tied = [c for c in candidates if scores[c] <= least * (1 + 1e-12)]
    best = n_t if n_t in tied else min(tied)
    return Advice(
        n_t=best,
        batch=batch * n_t // best,
        current_n_t=n_t,
        current_batch=batch,
        noise=noise,
        error=error,
        forward_passes=budget,
        criterion=criterion,
    )
