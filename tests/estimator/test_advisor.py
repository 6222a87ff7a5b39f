"""The budget advisor's maths (:mod:`vrpo.estimator.advisor`) on synthetic scores with known mask and pair
variances: both estimators unbiased, the noise, bias and loss-error predictions equal to simulated ones, and the
advice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vrpo.estimator.advisor import (
    advise,
    predicted_bias,
    predicted_loss_error,
    predicted_noise,
    sample_scores,
    variance_parts,
)

from ..helpers import assert_unbiased

SIGMA_PAIR2 = 0.5  # the pair part: Var over pairs of E[s | pair]
MASK_SCALES = torch.tensor([0.5, 1.0, 2.0, 3.0])  # per-pair mask sd, cycled: sigma_mask^2 = mean of squares = 3.5625


def synthetic(g, reps: int, B: int, n: int, sigma_pair2: float = SIGMA_PAIR2) -> torch.Tensor:
    """float64 [reps, B, n]: s_ij = mu_i + sd_i eps_ij with mu_i ~ N(0.3, sigma_pair2) and per-pair mask sd's
    (heteroscedastic, so the mask part is a mean over pairs and not one pair's variance)."""
    mu = 0.3 + math.sqrt(sigma_pair2) * torch.randn(reps, B, 1, generator=g, dtype=torch.float64)
    sd = MASK_SCALES.double().repeat(B // len(MASK_SCALES) + 1)[:B].view(1, B, 1)
    return mu + sd * torch.randn(reps, B, n, generator=g, dtype=torch.float64)


def test_both_estimators_are_unbiased():
    """4000 minibatches of 8 pairs x 4 samples: the mean estimates are within 4.5 standard errors of the true
    variances. Catches a ddof=0 mask variance (biased by 3/4, ~60 SE off) and a pair part that forgets to
    subtract the mask part over n (biased by 0.89, ~30 SE off)."""
    g = torch.Generator().manual_seed(0)
    reps, B, n = 4000, 8, 4
    x = synthetic(g, reps, B, n)
    parts = [variance_parts(x[r]) for r in range(reps)]
    mask = torch.tensor([p.mask for p in parts], dtype=torch.float64)
    pairs_raw = torch.tensor([p.pairs_raw for p in parts], dtype=torch.float64)
    true_mask = float((MASK_SCALES.double() ** 2).mean())
    assert_unbiased(mask[None], torch.tensor([true_mask], dtype=torch.float64))
    assert_unbiased(pairs_raw[None], torch.tensor([SIGMA_PAIR2], dtype=torch.float64))
    # The clamp: a single estimate may come out negative; the reported part never does.
    assert (pairs_raw < 0).any() and all(p.pairs >= 0 and p.pairs == max(p.pairs_raw, 0.0) for p in parts)
    assert parts[0].mask_of_mean() == pytest.approx(parts[0].mask / n)


@pytest.mark.parametrize("n_t", [1, 2, 4, 8, 16])
def test_predicted_noise_is_the_simulated_noise_at_equal_forward_passes(n_t):
    """The minibatch-mean score of N / n_t pairs with n_t samples each, over 4000 minibatches: its variance is
    the prediction, within 5 standard errors of a sample variance (sd of s^2 ~ sqrt(2 / reps)). Catches dividing
    by the run's batch instead of N / n_t (off by up to 16x)."""
    g = torch.Generator().manual_seed(n_t)
    reps, N = 4000, 64
    x = synthetic(g, reps, N // n_t, n_t)
    got = float(x.mean((1, 2)).var())
    want = predicted_noise(float((MASK_SCALES.double() ** 2).mean()), SIGMA_PAIR2, N, n_t)
    assert abs(got / want - 1) < 5 * math.sqrt(2 / reps)


@pytest.mark.parametrize("variance", [0.01, 1.0, 4.0, 44.0])
def test_predicted_bias_is_the_simulated_bias(variance):
    """E[softplus(e)] - log 2 for Gaussian e, against 10^6 draws (within 4.5 SE): small variances give ~v/8, and
    the paper's bound sqrt(v) holds. Catches the sd used for the variance, or log 2 not subtracted."""
    g = torch.Generator().manual_seed(1)
    e = math.sqrt(variance) * torch.randn(10**6, generator=g, dtype=torch.float64)
    x = F.softplus(e) - math.log(2)
    assert abs(predicted_bias(variance, 1) - float(x.mean())) <= 4.5 * float(x.std()) / 1000
    assert predicted_bias(variance, 4) == pytest.approx(predicted_bias(variance / 4, 1))
    assert predicted_bias(variance, 1) <= math.sqrt(variance)
    if variance <= 0.01:
        assert predicted_bias(variance, 1) == pytest.approx(variance / 8, rel=0.02)


def simulated_loss_error(g, sigma_pair2: float, mask: float, N: int, n_t: int, reps: int = 4000) -> float:
    """Mean squared error of the minibatch-mean loss softplus(-s_hat_i) of N / n_t pairs (n_t samples each,
    scores around 0) against the population loss E[softplus(-mu)], over ``reps`` minibatches."""
    B = N // n_t
    mu = math.sqrt(sigma_pair2) * torch.randn(reps, B, 1, generator=g, dtype=torch.float64)
    s = mu + math.sqrt(mask) * torch.randn(reps, B, n_t, generator=g, dtype=torch.float64)
    loss = F.softplus(-s.mean(-1)).mean(-1)
    target = float(F.softplus(-math.sqrt(sigma_pair2) * torch.randn(10**6, generator=g, dtype=torch.float64)).mean())
    return float(((loss - target) ** 2).mean())


@pytest.mark.parametrize(
    "sigma_pair2, mask, want", [(0.25, 0.04, 1), (0.01, 1.0, 8)], ids=["noise-dominated", "bias-dominated"]
)
def test_loss_error_advice_is_the_n_t_of_least_simulated_loss_error(sigma_pair2, mask, want):
    """The comparison criterion. At 64 forward passes per step: with a large pair part and a small mask part, more
    pairs win (n_t = 1); with
    a large mask part the loss's bias dominates and 8 masks per pair win. The predicted error of each candidate
    is the simulated one within 12% (second-order approximations), and the advised n_t's simulated error is
    within 5% of the least. Catches a criterion that ignores the bias (n_t = 1: the bias-dominated case
    fails), a bias not squared, or a noise without the loss's slope (1/4)."""
    g = torch.Generator().manual_seed(3)
    advice = advise((mask, sigma_pair2), batch=8, n_t=8, criterion="loss_error")
    assert advice.n_t == want and advice.batch == 64 // want
    simulated = {c: simulated_loss_error(g, sigma_pair2, mask, 64, c) for c in advice.error}
    for c in advice.error:
        assert advice.error[c] == pytest.approx(simulated[c], rel=0.12), (c, advice.error, simulated)
        assert advice.error[c] == pytest.approx(predicted_loss_error(mask, sigma_pair2, 64, c))
    assert simulated[advice.n_t] <= 1.05 * min(simulated.values()), simulated


def test_noise_advice_picks_the_n_t_of_least_simulated_noise():
    """The default criterion, from variances estimated on one run's minibatches (8 pairs x 8 samples): the n_t
    whose simulated minibatch noise at the run's budget is least. With a pair part, the fewest masks (even
    where the loss-error criterion wants 8); with none, all tie and the run's own n_t stays. Catches an advice
    that minimises noise per pair instead of per budget (it would pick 16)."""
    g = torch.Generator().manual_seed(7)
    for sigma_pair2, want in ((SIGMA_PAIR2, 1), (0.0, 8)):
        x = synthetic(g, 200, 8, 8, sigma_pair2)
        parts = [variance_parts(x[r]) for r in range(200)]
        mask = sum(p.mask for p in parts) / len(parts)
        pairs = max(sum(p.pairs_raw for p in parts) / len(parts), 0.0)
        advice = advise((mask, pairs if sigma_pair2 else 0.0), batch=8, n_t=8)
        assert advice.criterion == "noise" and advice.n_t == want and advice.batch == 64 // want
        simulated = {c: float(synthetic(g, 3000, 64 // c, c, sigma_pair2).mean((1, 2)).var()) for c in advice.noise}
        if sigma_pair2:
            assert min(simulated, key=simulated.get) == advice.n_t, simulated
    assert advise((1.0, 0.01), batch=8, n_t=8).n_t == 1 and advise((1.0, 0.01), 8, 8, criterion="loss_error").n_t == 8


def test_loss_error_advice_from_estimated_variances_and_ties():
    """From variances estimated on one run's minibatches (8 pairs x 8 samples, scores around 0): an advice whose
    true loss error is within 5% of the least (8 and 16 nearly tie in the bias-dominated case); with both parts 0
    (the first step, policy = reference) all tie and the run's n_t stays."""
    g = torch.Generator().manual_seed(7)
    for sigma_pair2, mask, want in ((0.25, 0.04, 1), (0.01, 1.0, 8)):
        mu = math.sqrt(sigma_pair2) * torch.randn(200, 8, 1, generator=g, dtype=torch.float64)
        x = mu + math.sqrt(mask) * torch.randn(200, 8, 8, generator=g, dtype=torch.float64)
        parts = [variance_parts(x[r]) for r in range(200)]
        est = (sum(p.mask for p in parts) / 200, max(sum(p.pairs_raw for p in parts) / 200, 0.0))
        true = advise((mask, sigma_pair2), batch=8, n_t=8, criterion="loss_error")
        got = advise(est, batch=8, n_t=8, criterion="loss_error").n_t
        assert true.n_t == want and true.error[got] <= 1.05 * min(true.error.values())
    assert advise((0.0, 0.0), batch=8, n_t=4, criterion="loss_error").n_t == 4


def test_advice_sentence_and_candidates():
    # mask 1, pairs 1, budget 16 x 8 = 128: noise(1) = 2/128, noise(8) = (1 + 1/8) 8 / 128 = 9/128: 4.5x.
    advice = advise((1.0, 1.0), batch=16, n_t=8)
    assert advice.n_t == 1 and advice.batch == 128 and advice.gain() == pytest.approx(4.5)
    assert "n_t = 1 with batch 128 gives 4.5x less score noise than n_t = 8 with batch 16" in advice.sentence()
    by_error = advise((1.0, 1.0), batch=16, n_t=8, criterion="loss_error")
    assert by_error.gain() == pytest.approx(by_error.error[8] / by_error.error[by_error.n_t])
    assert "less predicted loss error (score noise and ELBO bias) than n_t = 8" in by_error.sentence()
    # Candidates must split the budget into whole pairs: 3 pairs x 2 timesteps = 6 admits n_t 1, 2 (and 3 is not
    # offered); n_yt multiplies the cost of a timestep.
    assert sorted(advise((1.0, 0.0), batch=3, n_t=2).noise) == [1, 2]
    assert predicted_noise(1.0, 1.0, 128, 2, n_yt=2) == pytest.approx(2 * predicted_noise(1.0, 1.0, 128, 2))
    same = advise((1.0, 0.5), batch=128, n_t=1)
    assert same.n_t == 1 and same.gain() == 1.0 and "the run's n_t = 1" in same.sentence()


def test_sample_scores_pair_policy_and_reference_per_sample():
    pc, pr, rc, rr = (torch.full((2, 3), v) for v in (4.0, 1.0, 3.0, 2.0))
    assert torch.equal(sample_scores(pc, pr, rc, rr, beta=0.5), torch.full((2, 3), 0.5 * ((4 - 3) - (1 - 2))))


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (4,)])
def test_too_few_pairs_or_samples_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="variance_parts"):
        variance_parts(torch.zeros(shape))
    with pytest.raises(ValueError, match="advise"):
        advise((-1.0, 0.0), batch=4, n_t=2)
    with pytest.raises(ValueError, match="criterion must be one of"):
        advise((1.0, 0.0), batch=4, n_t=2, criterion="bias")
