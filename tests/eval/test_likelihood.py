"""The eval likelihood estimator (vrpo.eval.likelihood): unbiasedness against exact enumeration, common
random numbers across choices, the adaptive stop, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from vrpo import exact_elbo
from vrpo.estimator.elbo import elbo_terms
from vrpo.estimator.sampling import MaskDraw, SamplingPlan
from vrpo.eval import likelihood as lk
from vrpo.eval.likelihood import LikelihoodEstimator, LikelihoodRequest, MCSettings

from ..helpers import ToyMDM, assert_unbiased, toy_batch


def toy_terms(model: ToyMDM):
    """The estimator's model interface on the toy (float64 logits, generic ELBO path)."""

    def terms(ids, resp, masked, weight):
        out = torch.empty(weight.shape)
        ends = (resp.long() * torch.arange(1, resp.shape[1] + 1)).amax(-1)
        for n in ends.unique().tolist():  # rows of one length together, unpadded (the toy has no attention mask)
            rows = (ends == n).nonzero()[:, 0]
            m = masked[rows, :, :n]
            draw = MaskDraw(m, weight[rows], m.sum(-1).float(), SamplingPlan(n_t=m.shape[1]))
            out[rows] = elbo_terms(model, ids[rows, :n], resp[rows, :n], draw, model.mask_token_id)
        return out

    return terms


def request(ids, resp, b, group):
    row, r = ids[b].tolist(), resp[b]
    P = int(r.nonzero()[0, 0])
    L = int(r.sum())
    return LikelihoodRequest(tuple(row[:P]), tuple(row[P : P + L]), group)


def exact_unpadded(model, ids, resp):
    """exact_elbo of each row without its padding (the toy model's output depends on every position)."""
    out = []
    for b in range(ids.shape[0]):
        n = int(resp[b].nonzero()[-1, 0]) + 1
        out.append(exact_elbo(model.logp, ids[b : b + 1, :n], resp[b : b + 1, :n], model.mask_token_id))
    return torch.cat(out)


def replicate(settings, model, ids, resp, K):
    """K independent estimates of each row (each replicate its own group), float64 [B, K]."""
    reqs = [request(ids, resp, b, f"rep{k}") for k in range(K) for b in range(ids.shape[0])]
    est = LikelihoodEstimator(toy_terms(model), settings, max_sequences=4096).estimate(reqs)
    return torch.tensor([e.mean for e in est], dtype=torch.float64).view(K, -1).T


@pytest.mark.parametrize(
    "settings",
    [MCSettings(mc_num=4), MCSettings(mc_num=3), MCSettings(mc_num=4, crn=False)],
    ids=["crn4", "crn3", "independent4"],
)
def test_fixed_budget_is_unbiased_against_exact_enumeration(settings):
    model = ToyMDM(seed=4)
    ids, resp = toy_batch([2, 3], [3, 4], seed=4, pad_to=8)  # two contexts' continuations
    exact = exact_unpadded(model, ids, resp)
    assert_unbiased(replicate(settings, model, ids, resp, K=2000), exact)


def test_unbiasedness_check_has_power_against_a_wrong_weight(monkeypatch):
    # Drop the L / l weight (a plausible slip: the per-token mean instead of the l-uniform weight): caught.
    real = lk.crn_draw

    def unweighted(*args):
        masked, weight = real(*args)
        return masked, torch.ones_like(weight)

    monkeypatch.setattr(lk, "crn_draw", unweighted)
    model = ToyMDM(seed=4)
    ids, resp = toy_batch([2, 3], [3, 4], seed=4, pad_to=8)
    exact = exact_unpadded(model, ids, resp)
    with pytest.raises(AssertionError):
        assert_unbiased(replicate(MCSettings(mc_num=4), model, ids, resp, K=2000), exact)


class Recorder:
    """A terms_fn that records each continuation's masks and weights per call (terms: zeros)."""

    def __init__(self):
        self.rows = []

    def __call__(self, ids, resp, masked, weight):
        for b in range(ids.shape[0]):
            self.rows.append((tuple(ids[b][resp[b]].tolist()), masked[b][:, resp[b]], weight[b]))
        return torch.zeros(weight.shape)


def shared_quantile_ok(levels_a, L_a, levels_b, L_b, R) -> bool:
    """True when one stratification offset explains both continuations' levels: sample j's level l of a
    continuation of L tokens needs ``u_j = (j + offset) / R`` in ``[(l - 1) / L, l / L)``, i.e. the offset in
    ``[R (l - 1) / L - j, R l / L - j)``; the intersection over all samples of both must be non-empty."""
    lo, hi = 0.0, 1.0
    for levels, L in ((levels_a, L_a), (levels_b, L_b)):
        for j, level in enumerate(levels.tolist()):
            lo, hi = max(lo, R * (level - 1) / L - j), min(hi, R * level / L - j)
    return lo < hi


def crn_draws(crn: bool, R: int = 16):
    rec = Recorder()
    ctx = (1, 2, 3)
    conts = [(4, 5, 4, 5, 4), (5, 4, 5, 4, 4), (4, 4, 5)]  # two of length 5, one of length 3
    LikelihoodEstimator(rec, MCSettings(mc_num=R, crn=crn)).estimate(
        [LikelihoodRequest(ctx, c, group="q") for c in conts]
    )
    return {cont: (m, w) for cont, m, w in rec.rows}, conts


def test_choices_of_one_context_share_levels_and_masks():
    draws, (a, b, c) = crn_draws(crn=True)
    (ma, wa), (mb, wb), (mc, _) = draws[a], draws[b], draws[c]
    assert torch.equal(ma, mb) and torch.equal(wa, wb)  # same length: same masks
    assert shared_quantile_ok(ma.sum(-1), 5, mc.sum(-1), 3, 16)  # other length: same quantiles
    assert len(set(ma.sum(-1).tolist())) > 1  # and the levels do vary across samples


def test_crn_check_fails_when_choices_draw_independent_levels():
    draws, (a, b, c) = crn_draws(crn=False)
    (ma, _), (mb, _), (mc, _) = draws[a], draws[b], draws[c]
    assert not torch.equal(ma, mb)
    assert not shared_quantile_ok(ma.sum(-1), 5, mc.sum(-1), 3, 16)


def test_crn_lowers_the_variance_of_the_difference_between_choices():
    model = ToyMDM(seed=7)
    ids, resp = toy_batch([3, 3], [4, 4], seed=7, pad_to=7)
    ids[1, :3] = ids[0, :3]  # one context, two continuations
    gaps = {}
    for crn in (True, False):
        reqs = [request(ids, resp, b, f"q{k}") for k in range(300) for b in range(2)]
        est = LikelihoodEstimator(toy_terms(model), MCSettings(mc_num=4, crn=crn), 4096).estimate(reqs)
        means = torch.tensor([e.mean for e in est]).view(300, 2)
        gaps[crn] = (means[:, 0] - means[:, 1]).var()
    assert gaps[True] < 0.5 * gaps[False], gaps


class Scripted:
    """A terms_fn whose continuation k (its first token) has per-sample terms mean[k] + noise[k] * z."""

    def __init__(self, mean, noise):
        self.mean, self.noise = mean, noise
        self.g = torch.Generator().manual_seed(0)

    def __call__(self, ids, resp, masked, weight):
        first = torch.stack([ids[b][resp[b]][0] for b in range(ids.shape[0])])
        z = torch.randn(weight.shape, generator=self.g, dtype=torch.float64)
        return (torch.tensor(self.mean)[first][:, None] + torch.tensor(self.noise)[first][:, None] * z).float()


def adaptive_n(mean, noise, **kw):
    settings = MCSettings(mc_round=8, mc_max=64, mc_target_se=0.1, **kw)
    reqs = [LikelihoodRequest((9,), (k,), group="q") for k in range(len(mean))]
    est = LikelihoodEstimator(Scripted(mean, noise), settings).estimate(reqs)
    return [e.n for e in est]


def test_adaptive_stops_once_the_top_two_gap_is_precise():
    # The two best choices are noise-free: one round settles it, however noisy the third is.
    assert adaptive_n([-1.0, -5.0, -10.0], [0.0, 0.0, 50.0]) == [8, 8, 8]


def test_adaptive_runs_to_mc_max_while_the_top_two_gap_is_noisy():
    assert adaptive_n([-1.0, -1.5, -10.0], [0.0, 5.0, 0.0]) == [64, 64, 64]


def test_adaptive_stops_in_between_at_the_target():
    # noise 1: SE of the gap = 1 / sqrt(n) < 0.1 needs n > 100 -> mc_max; noise 0.5 needs n > 25 -> 32.
    n = adaptive_n([-1.0, -3.0], [0.0, 0.5])
    assert n[0] == n[1] and 24 <= n[0] <= 48, n


def test_lone_continuation_stops_on_its_own_standard_error():
    assert adaptive_n([-1.0], [0.0]) == [8]
    assert adaptive_n([-1.0], [3.0]) == [64]


def test_estimates_do_not_depend_on_batching_or_request_order():
    model = ToyMDM(seed=2)
    ids, resp = toy_batch([2, 2, 3], [3, 2, 4], seed=2, pad_to=8)
    reqs = [request(ids, resp, b, f"g{b % 2}") for b in range(3)]
    settings = MCSettings(mc_round=4, mc_max=16, mc_target_se=1e-3)
    full = LikelihoodEstimator(toy_terms(model), settings, max_sequences=64).estimate(reqs)
    small = LikelihoodEstimator(toy_terms(model), settings, max_sequences=4).estimate(reqs[::-1])[::-1]
    assert [e.n for e in full] == [e.n for e in small]
    assert [e.mean for e in full] == pytest.approx([e.mean for e in small], rel=1e-12)


def test_standard_error_is_the_spread_of_the_mean():
    model = ToyMDM(seed=3)
    ids, resp = toy_batch([2], [4], seed=3)
    reqs = [request(ids, resp, 0, f"rep{k}") for k in range(400)]
    est = LikelihoodEstimator(toy_terms(model), MCSettings(mc_num=8, crn=True), 4096).estimate(reqs)
    means = torch.tensor([e.mean for e in est], dtype=torch.float64)
    mean_se = sum(e.se for e in est) / len(est)
    # Stratification makes the per-round SE conservative; it must not be off by more than a factor ~2.
    assert 0.7 * means.std() <= mean_se <= 2.0 * means.std(), (float(means.std()), mean_se)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(scheme="mdlm"), "mc_scheme"),
        (dict(mc_num=1), "mc_num"),
        (dict(mc_target_se=0.0), "mc_target_se"),
        (dict(mc_round=1), "mc_round"),
        (dict(mc_max=4, mc_round=8), "mc_max"),
        (dict(scheme="llada", mc_num=100, mc_batch=32), "mc_batch"),
    ],
)
def test_bad_settings_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        MCSettings(**kw)


def test_empty_continuation_is_refused():
    with pytest.raises(ValueError, match="non-empty continuation"):
        LikelihoodEstimator(Recorder(), MCSettings(mc_num=2)).estimate([LikelihoodRequest((1,), (), "q")])


def test_llada_scheme_reproduces_its_rounding_bias():
    # LLaDA's counts round(k + i L / b) are not uniform on 1..L when b does not divide L (torch.round
    # rounds half to even): L=3, b=2 gives k=1: (1, 2), k=2: (2, 1), k=3: (3, 1), so P(l) = 1/2, 1/3, 1/6.
    # mc_scheme=llada reproduces the scheme, bias included.
    counts = torch.cat(
        [
            lk.llada_draw(MCSettings(scheme="llada", mc_num=2, mc_batch=2), f"g{s}", 0, 0, 3, 2)[0].sum(-1)
            for s in range(3000)
        ]
    )
    freq = torch.bincount(counts, minlength=4)[1:].double() / counts.numel()
    assert torch.allclose(freq, torch.tensor([1 / 2, 1 / 3, 1 / 6], dtype=torch.float64), atol=0.02), freq


def test_llada_scheme_draws_evenly_spaced_counts():
    masked, weight = lk.llada_draw(MCSettings(scheme="llada"), "g", 0, 0, 10, 32)
    counts = masked.sum(-1)
    assert counts.min() >= 1 and counts.max() <= 10
    assert torch.allclose(weight, (10 / counts).float())
    # 32 samples over 10 levels, evenly spaced: every level 3 or 4 times.
    assert set(torch.bincount(counts, minlength=11)[1:].tolist()) <= {3, 4}
    assert math.isclose(float(weight.sum()), float((10 / counts.double()).sum()), rel_tol=1e-6)
