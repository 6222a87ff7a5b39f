"""GRPO's maths on ELBO estimates: advantages, the clipped ratio, the KL term, and the log-ratio estimator
(unbiased against enumeration; shared masks beat independent ones)."""

import math

import pytest
import torch

from vrpo.estimator import (
    SamplingPlan,
    clipped_objective,
    draw_masks,
    elbo_terms,
    exact_elbo,
    group_advantages,
    grpo_loss,
    k3_kl,
)

from ..helpers import ToyMDM, assert_unbiased, toy_batch


def test_group_advantages_on_hand_made_numbers():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv, zero_std = group_advantages(rewards, "group")
    std0 = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1), as TRL and DeepSeekMath's implementation use
    std2 = math.sqrt(2 / 3)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]])
    scale = torch.tensor([[std0 + 1e-4], [1.0], [std2 + 1e-4]])
    torch.testing.assert_close(adv, expected / scale)
    assert zero_std.tolist() == [False, True, False]
    assert (adv[1] == 0).all()  # exactly: an all-equal group gives no gradient, and no NaN from 0 / 0
    dr, _ = group_advantages(rewards, "none")  # Dr. GRPO: centred, not scaled
    torch.testing.assert_close(dr, expected)


def test_all_equal_rewards_are_exactly_zero_even_when_the_mean_rounds():
    # mean(0.9, 0.9, 0.9) != 0.9 in floating point: a centred group of equal rewards must still be exactly 0.
    rewards = torch.full((1, 3), 0.9)
    adv, zero_std = group_advantages(rewards, "group")
    assert zero_std.item() and (adv == 0).all()


def test_group_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(2, 2), "std")


def test_clipped_objective_on_hand_made_numbers():
    # ratio 1.5 and 0.5, advantage +1 and -1, epsilon 0.2: PPO's min(r A, clip(r) A).
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    log_ratio = ratio.log().requires_grad_()
    obj, clipped = clipped_objective(log_ratio, adv, 0.2)
    torch.testing.assert_close(obj, torch.tensor([1.2, -1.5, 0.5, -0.8]))
    assert clipped.tolist() == [True, False, False, True]
    obj.sum().backward()
    # d(r A)/d log r = r A where unclipped; 0 where the clip is active.
    torch.testing.assert_close(log_ratio.grad, torch.tensor([0.0, -1.5, 0.5, 0.0]))


def test_grpo_loss_gradient_is_minus_advantage_times_elbo_gradient_at_ratio_one():
    # num_iterations = 1: old terms are the new ones, detached; the loss is -mean_b(A_b * B_hat_b), whose
    # gradient on each of the n terms of row b is -A_b / (B n).
    new = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    loss, metrics = grpo_loss(new, new.detach(), adv, epsilon=0.2)
    loss.backward()
    torch.testing.assert_close(new.grad, (-adv / 12)[:, None].expand(3, 4))
    assert metrics["clip_ratio"] == 0 and metrics["score/mean"] == 0 and metrics["score/var"] == 0
    torch.testing.assert_close(metrics["elbo/var"], (new.detach().var(-1) / 4).mean())


def test_kl_term_is_k3_of_the_elbo_difference_on_shared_masks():
    new = torch.tensor([[-3.0, -5.0], [-2.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-4.0, -5.0], [-2.0, -2.0]])
    loss, metrics = grpo_loss(new, new.detach(), torch.zeros(2), 0.2, ref, beta=0.5)
    d = torch.tensor([-0.5, 0.0])  # B_ref - B_new per row
    kl = torch.exp(d) - d - 1
    torch.testing.assert_close(metrics["kl"], kl.mean())
    torch.testing.assert_close(loss, 0.5 * kl.mean())
    assert (k3_kl(torch.linspace(-3, 3, 13)) >= 0).all()
    with pytest.raises(ValueError, match="beta > 0 needs ref_terms"):
        grpo_loss(new, new.detach(), torch.zeros(2), 0.2, None, beta=0.5)


def _log_ratio_samples(new, old, ids, resp, plan, K, seed, shared):
    """K estimates of B_new - B_old per row, float64 [B, K]: the two models on one draw or two."""
    g = torch.Generator().manual_seed(seed)
    ids_k, resp_k = ids.repeat_interleave(K, 0), resp.repeat_interleave(K, 0)
    draw = draw_masks(resp_k, plan, generator=g)
    other = draw if shared else draw_masks(resp_k, plan, generator=g)
    est = elbo_terms(new, ids_k, resp_k, draw, new.mask_token_id).mean(-1) - elbo_terms(
        old, ids_k, resp_k, other, old.mask_token_id
    ).mean(-1)
    return est.double().view(ids.shape[0], K)


def test_log_ratio_is_unbiased_and_shared_masks_lower_its_variance():
    old = ToyMDM(seed=11)
    new = old.perturbed(0.1, seed=12)  # a policy one small step away from the rollout policy
    ids, resp = toy_batch([2, 3], [4, 5], seed=11, pad_to=9)
    exact = exact_elbo(new.logp, ids, resp, new.mask_token_id) - exact_elbo(old.logp, ids, resp, old.mask_token_id)
    plan = SamplingPlan(n_t=4, stratified=True)
    shared = _log_ratio_samples(new, old, ids, resp, plan, K=3000, seed=0, shared=True)
    independent = _log_ratio_samples(new, old, ids, resp, plan, K=3000, seed=1, shared=False)
    assert_unbiased(shared, exact)
    assert_unbiased(independent, exact)
    # Shared masks cancel most of the noise (LLaDA 1.5, Theorem 2): far more than sampling error could explain.
    assert (shared.var(-1) * 10 < independent.var(-1)).all(), (shared.var(-1), independent.var(-1))
