"""SamplingPlan and draw_masks: shapes, supports, weights, determinism, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vrpo import SamplingPlan, draw_masks
from vrpo.estimator.sampling import draw_levels

from ..helpers import toy_batch

plans = st.builds(
    SamplingPlan,
    n_t=st.integers(1, 5),
    n_yt=st.integers(1, 3),
    estimator=st.sampled_from(["l_uniform", "t_bernoulli"]),
    stratified=st.booleans(),
)


@given(
    plan=plans,
    rows=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 7)), min_size=1, max_size=4),
    extra_pad=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_draw_shapes_support_and_weights(plan, rows, extra_pad, seed):
    prompts, responses = zip(*rows)
    L = max(p + r for p, r in rows) + extra_pad
    _, resp = toy_batch(prompts, responses, pad_to=L)
    g = torch.Generator().manual_seed(seed)
    draw = draw_masks(resp, plan, generator=g)
    B = len(rows)
    assert draw.masked.shape == (B, plan.n, L) and draw.masked.dtype == torch.bool
    assert draw.weight.shape == (B, plan.n) and draw.weight.dtype == torch.float32
    # Never outside the response: prompt and padding stay visible.
    assert not (draw.masked & ~resp[:, None, :]).any()
    # The n_yt masks of one level share its weight.
    w = draw.weight.view(B, plan.n_t, plan.n_yt)
    assert torch.equal(w, w[..., :1].expand_as(w))
    Lb = resp.sum(-1, keepdim=True).float()
    if plan.estimator == "l_uniform":
        counts = draw.masked.sum(-1).float()
        assert (counts >= 1).all() and (counts <= Lb).all()
        torch.testing.assert_close(draw.weight, Lb / counts)
    else:
        assert (draw.weight >= 1.0).all()


def test_same_seed_same_draw_and_different_seed_differs():
    _, resp = toy_batch([2, 0, 3], [5, 6, 4])
    plan = SamplingPlan(n_t=4, n_yt=2)
    a = draw_masks(resp, plan, generator=torch.Generator().manual_seed(7))
    b = draw_masks(resp, plan, generator=torch.Generator().manual_seed(7))
    c = draw_masks(resp, plan, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.masked, c.masked)


def test_single_response_token_is_always_masked_with_weight_one():
    _, resp = toy_batch([3], [1])
    draw = draw_masks(resp, SamplingPlan(n_t=6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw.masked[0, :, 3], torch.ones(6, dtype=torch.bool))
    assert draw.masked.sum().item() == 6 and torch.equal(draw.weight, torch.ones(1, 6))


def test_t_bernoulli_masks_a_single_token_with_probability_p_and_weight_one_over_p():
    # One response token: sample j masks it with probability p_j (its level) and carries weight 1 / p_j.
    n = 4000
    _, resp = toy_batch([3], [1])
    plan = SamplingPlan(n_t=n, estimator="t_bernoulli")
    draw = draw_masks(resp, plan, generator=torch.Generator().manual_seed(0))
    p = draw.levels[0].double()
    torch.testing.assert_close(draw.weight[0], 1.0 / draw.levels[0], rtol=0, atol=0)
    assert not draw.masked[0, :, :3].any()
    hit = draw.masked[0, :, 3].double()
    # Per quarter of [0, 1]: the masked count equals sum(p) within 5 binomial standard errors
    # (~1000 samples per quarter: sd <= sqrt(1000 / 4) ~ 16 against gaps of ~250 for p -> 1 - p or p -> 1).
    for lo in (0.0, 0.25, 0.5, 0.75):
        q = (p > lo) & (p <= lo + 0.25)
        expected, sd = p[q].sum(), (p[q] * (1 - p[q])).sum().sqrt()
        assert (hit[q].sum() - expected).abs() <= 5 * sd, (lo, hit[q].sum().item(), expected.item())


def test_empty_row_is_a_clear_error_naming_the_row():
    _, resp = toy_batch([2, 2, 2], [3, 3, 3])
    resp[1] = False
    with pytest.raises(ValueError, match="row 1 has no response tokens"):
        draw_masks(resp, SamplingPlan(), generator=torch.Generator().manual_seed(0))


def test_response_mask_must_be_bool_2d():
    with pytest.raises(ValueError, match="bool tensor"):
        draw_masks(torch.ones(2, 5), SamplingPlan())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_t=0), "n_t must be a positive integer"),
        (dict(n_t=-2), "n_t must be a positive integer"),
        (dict(n_yt=1.5), "n_yt must be a positive integer"),
        (dict(estimator="uniform"), "estimator must be one of"),
        (dict(t_floor=1.0), "t_floor"),
    ],
)
def test_plan_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingPlan(**kwargs)


def test_naive_plan_is_one_sample_without_antithetic():
    plan = SamplingPlan.naive()
    assert (plan.n_t, plan.n_yt, plan.antithetic, plan.n) == (1, 1, False, 1)


def test_stratified_levels_cover_each_stratum_once():
    lengths = torch.full((500,), 1000)
    levels, _ = draw_levels(lengths, SamplingPlan(n_t=4, stratified=True), torch.Generator().manual_seed(0))
    strata = ((levels - 1) / 1000 * 4).floor()
    assert torch.equal(strata, torch.arange(4.0).expand(500, 4))


def test_levels_are_uniform_on_one_to_L():
    lengths = torch.full((20000,), 5)
    for stratified in (False, True):
        levels, weight = draw_levels(
            lengths, SamplingPlan(n_t=2, stratified=stratified), torch.Generator().manual_seed(1)
        )
        freq = torch.bincount(levels.flatten().long(), minlength=6)[1:].double() / levels.numel()
        assert (freq - 0.2).abs().max() < 0.01
        torch.testing.assert_close(weight, 5 / levels)


def test_t_floor_bounds_the_weight():
    lengths = torch.full((10000,), 8)
    plan = SamplingPlan(n_t=1, estimator="t_bernoulli", t_floor=1e-3)
    p, weight = draw_levels(lengths, plan, torch.Generator().manual_seed(0))
    assert p.min() >= 1e-3 and weight.max() <= 1000.0
