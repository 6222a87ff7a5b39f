"""The budget advisor in a run: the score's mask and pair variances and the advised ``n_t``, every logged step
and over the whole run (:mod:`vrpo.estimator.advisor` has the maths)."""

from __future__ import annotations

from dataclasses import dataclass

from ..estimator import SamplingPlan
from ..estimator.advisor import Advice, advise, sample_scores, variance_parts

VAR_MASK, VAR_PAIRS, VAR_PAIRS_RAW, ADVICE = "score/var_mask", "score/var_pairs", "score/var_pairs_raw", "advice/n_t"


def step_variances(pc, pr, rc, rr, beta: float) -> dict[str, float]:
    """``score/var_mask`` (the mask part of one pair's score variance, ``sigma_mask^2 / n_t``) and
    ``score/var_pairs_raw`` (the unclamped, unbiased pair part) of one micro-batch of grouped terms [B, n_t];
    empty when B or n_t is below 2 (no variance can be estimated)."""
    scores = sample_scores(pc, pr, rc, rr, beta)
    if scores.shape[0] < 2 or scores.shape[1] < 2:
        return {}
    parts = variance_parts(scores)
    # Python floats, not tensors: nothing of the advisor stays allocated through backward and the update.
    return {VAR_MASK: parts.mask_of_mean(), VAR_PAIRS_RAW: parts.pairs_raw}


def advice_of(
    var_mask: float, var_pairs_raw: float, batch: int, plan: SamplingPlan, criterion: str = "noise"
) -> Advice:
    """The advice from mean variances as runs log them (``var_mask`` over n_t; the pair part clamped at 0 after
    averaging, so the mean stays unbiased)."""
    return advise((var_mask * plan.n_t, max(var_pairs_raw, 0.0)), batch, plan.n_t, plan.n_yt, criterion=criterion)


def advice_metrics(record: dict, batch: int, plan: SamplingPlan) -> dict:
    """``score/var_pairs`` (clamped) and ``advice/n_t`` for a log record holding the window's mean variances."""
    if VAR_MASK not in record or VAR_PAIRS_RAW not in record:
        return {}
    advice = advice_of(record[VAR_MASK], record[VAR_PAIRS_RAW], batch, plan)
    return {VAR_PAIRS: max(record[VAR_PAIRS_RAW], 0.0), ADVICE: advice.n_t}


@dataclass
class VarianceTally:
    """The run's mean variances over its steps (since the start, or since resuming), for ``summary.json``."""

    mask: float = 0.0
    pairs_raw: float = 0.0
    steps: int = 0

    def add(self, metrics: dict):
        if VAR_MASK in metrics and VAR_PAIRS_RAW in metrics:
            self.mask += float(metrics[VAR_MASK])
            self.pairs_raw += float(metrics[VAR_PAIRS_RAW])
            self.steps += 1

    def summary(self, batch: int, plan: SamplingPlan) -> dict:
        """``{score/var_mask, score/var_pairs, advice/n_t, advice/batch, advice/noise, advice/loss_error, advice}``;
        empty without
        estimates (n_t = 1 or micro-batches of one pair)."""
        if not self.steps:
            return {}
        mask, pairs_raw = self.mask / self.steps, self.pairs_raw / self.steps
        advice = advice_of(mask, pairs_raw, batch, plan)
        return {
            VAR_MASK: mask,
            VAR_PAIRS: max(pairs_raw, 0.0),
            ADVICE: advice.n_t,
            "advice/batch": advice.batch,
            "advice/noise": {str(k): v for k, v in advice.noise.items()},
            "advice/loss_error": {str(k): v for k, v in advice.error.items()},
            "advice": advice.sentence(),
        }
