"""The paper's variance reductions, checked statistically on a toy model with fixed seeds.

Each test compares the variance of the score estimate ``s_hat`` over many independent replicates
of the same preference pairs. With 4000 replicates a sample variance has a relative standard error
of about sqrt(2/4000) = 2%, so the asserted gaps (>= 15%) are many standard errors wide.
"""

import torch

from vrpo import SamplingPlan, draw_masks, elbo_estimate, exact_elbo, vrpo_loss

from .toy import ToyMDM, toy_batch

BETA = 0.2
K = 4000


def pairs(seed=0):
    """Two preference pairs with different prompt/response lengths (chosen, rejected)."""
    chosen = toy_batch([2, 1], [5, 4], seed=seed, pad_to=8)
    rejected = toy_batch([2, 1], [4, 6], seed=seed + 1, pad_to=8)
    return chosen, rejected


def estimate(model, batch, draw):
    ids, resp = batch
    return elbo_estimate(model, ids, resp, draw, model.mask_token_id).double()


def score_replicates(policy, ref, plan, seed=0, pair_seed=0):
    """float64 [K, 2]: independent replicates of s_hat for two pairs."""
    (ids_w, resp_w), (ids_l, resp_l) = pairs(pair_seed)
    rep = lambda t: t.repeat(K, 1)  # noqa: E731
    chosen, rejected = (rep(ids_w), rep(resp_w)), (rep(ids_l), rep(resp_l))
    g = torch.Generator().manual_seed(seed)
    draw_w, draw_l = draw_masks(chosen[1], plan, generator=g), draw_masks(rejected[1], plan, generator=g)
    if plan.antithetic:
        ref_draw_w, ref_draw_l = draw_w, draw_l
    else:
        ref_draw_w, ref_draw_l = draw_masks(chosen[1], plan, generator=g), draw_masks(rejected[1], plan, generator=g)
    s = BETA * (
        (estimate(policy, chosen, draw_w) - estimate(ref, chosen, ref_draw_w))
        - (estimate(policy, rejected, draw_l) - estimate(ref, rejected, ref_draw_l))
    )
    return s.view(K, 2)


def score_variance(policy, ref, plan, seed=0):
    return score_replicates(policy, ref, plan, seed).var(0).mean().item()


REF = ToyMDM(seed=11)
POLICY = REF.perturbed(0.05)


def test_score_estimate_is_unbiased():
    (ids_w, resp_w), (ids_l, resp_l) = pairs()
    exact = lambda m, ids, resp: exact_elbo(m.logp, ids, resp, m.mask_token_id)  # noqa: E731
    true_score = BETA * (
        (exact(POLICY, ids_w, resp_w) - exact(REF, ids_w, resp_w))
        - (exact(POLICY, ids_l, resp_l) - exact(REF, ids_l, resp_l))
    )
    for plan in (SamplingPlan(n_t=2), SamplingPlan(n_t=2, antithetic=False), SamplingPlan(n_t=2, stratified=True)):
        s = score_replicates(POLICY, REF, plan, seed=3)
        se = s.std(0) / K**0.5
        assert ((s.mean(0) - true_score).abs() <= 4.5 * se + 1e-6).all(), (plan, s.mean(0), true_score, se)


def test_antithetic_sampling_lowers_variance_when_policy_is_close_to_reference():
    anti = score_variance(POLICY, REF, SamplingPlan(n_t=4, antithetic=True))
    indep = score_variance(POLICY, REF, SamplingPlan(n_t=4, antithetic=False))
    assert anti < 0.1 * indep, (anti, indep)


def test_fixed_budget_one_mask_per_timestep_has_the_lowest_variance():
    # Var = V_t / n_t + V_yt / (n_t n_yt): at n = 4, (4,1) < (2,2) < (1,4).
    v41, v22, v14 = (
        score_variance(POLICY, REF, SamplingPlan(n_t=n_t, n_yt=n_yt), seed=5) for n_t, n_yt in ((4, 1), (2, 2), (1, 4))
    )
    # The gaps are ~15%, about four standard errors of a variance ratio at K = 4000.
    assert v41 < 0.93 * v22 and v22 < 0.93 * v14, (v41, v22, v14)


def test_larger_budget_lowers_variance():
    v1, v8 = (score_variance(POLICY, REF, SamplingPlan(n_t=n), seed=6) for n in (1, 8))
    assert v8 < 0.25 * v1, (v1, v8)


def test_stratified_timesteps_lower_variance():
    # Checked for l-uniform, the default. Unfloored t-Bernoulli has an infinite variance (one masked
    # token carries weight 1/t with probability about L*t, so E[term^2] grows like the integral of
    # L/t dt), so its sample variances are ruled by the rarest tiny t and compare nothing.
    iid = score_variance(POLICY, REF, SamplingPlan(n_t=4), seed=7)
    strat = score_variance(POLICY, REF, SamplingPlan(n_t=4, stratified=True), seed=7)
    assert strat < 0.93 * iid, (strat, iid)


def test_score_var_metric_estimates_the_variance_of_the_score():
    # vrpo_loss's score/var, computed inside one draw, agrees with the variance across draws.
    plan = SamplingPlan(n_t=8, antithetic=False)
    (ids_w, resp_w), (ids_l, resp_l) = pairs()
    g = torch.Generator().manual_seed(9)
    rep = lambda t: t.repeat(500, 1)  # noqa: E731
    ids_w, resp_w, ids_l, resp_l = map(rep, (ids_w, resp_w, ids_l, resp_l))
    terms = []
    for model in (POLICY, POLICY, REF, REF):
        batch = (ids_w, resp_w) if len(terms) % 2 == 0 else (ids_l, resp_l)
        draw = draw_masks(batch[1], plan, generator=g)
        from vrpo import elbo_terms

        terms.append(elbo_terms(model, *batch, draw, model.mask_token_id).double())
    pc, pr, rc, rr = terms
    _, metrics = vrpo_loss(pc, pr, rc, rr, beta=BETA)
    scores = BETA * ((pc - rc) - (pr - rr)).mean(-1)
    across = scores.view(500, 2).var(0).mean()
    assert 0.8 < metrics["score/var"].item() / across.item() < 1.25
