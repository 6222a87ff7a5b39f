"""vrpo_loss and mdm_sft_loss against hand-computed formulas."""

import math

import pytest
import torch

from vrpo import mdm_sft_loss, vrpo_loss

PC, PR, RC, RR = (torch.tensor(v) for v in ([-10.0, -20.0], [-12.0, -18.0], [-11.0, -19.0], [-11.5, -18.5]))
# log-ratio margins: (pc - rc) - (pr - rr) = [1 - (-0.5), -1 - 0.5] = [1.5, -1.5]
MARGINS = [1.5, -1.5]


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    "loss_type, smoothing, per_pair",
    [
        ("sigmoid", 0.0, lambda m, b, ls: -math.log(sig(b * m))),
        ("sigmoid", 0.1, lambda m, b, ls: -(1 - ls) * math.log(sig(b * m)) - ls * math.log(sig(-b * m))),
        ("robust", 0.1, lambda m, b, ls: ((ls - 1) * math.log(sig(b * m)) + ls * math.log(sig(-b * m))) / (1 - 2 * ls)),
        ("hinge", 0.0, lambda m, b, ls: max(0.0, 1 - b * m)),
        ("ipo", 0.0, lambda m, b, ls: (m - 1 / (2 * b)) ** 2),
    ],
)
def test_losses_match_hand_computed_formulas(loss_type, smoothing, per_pair):
    beta = 0.2
    loss, _ = vrpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    expected = sum(per_pair(m, beta, smoothing) for m in MARGINS) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_metrics_use_trl_names_and_values():
    _, m = vrpo_loss(PC, PR, RC, RR, beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * ((1.0) + (-1.0)) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * ((-0.5) + (0.5)) / 2)
    assert m["rewards/margins"].item() == pytest.approx(0.0)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-15.0)
    assert m["logps/rejected"].item() == pytest.approx(-15.0)
    assert m["score/mean"].item() == pytest.approx(0.0)
    assert math.isnan(m["score/var"].item())  # one sample per estimate: no variance to estimate


def test_score_var_from_per_sample_terms():
    # Two pairs, three samples each: score/var = mean over pairs of var(sample scores) / n.
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.2
    _, m = vrpo_loss(pc, pr, rc, rr, beta=beta)
    s = beta * ((pc - rc) - (pr - rr))
    expected = (s.var(-1, unbiased=True) / 3).mean()
    assert m["score/var"].item() == pytest.approx(expected.item())
    loss_terms, _ = vrpo_loss(pc, pr, rc, rr, beta=beta)
    loss_means, _ = vrpo_loss(pc.mean(-1), pr.mean(-1), rc.mean(-1), rr.mean(-1), beta=beta)
    assert loss_terms.item() == pytest.approx(loss_means.item())


def test_gradients_reach_policy_terms_only():
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in (PC, PR, RC, RR))
    loss, _ = vrpo_loss(pc, pr, rc, rr, beta=0.2)
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert rc.grad is None and rr.grad is None
    # d loss / d pc = -beta * sigmoid(-beta * margin) / B
    expected = torch.tensor([-0.2 * sig(-0.2 * m) / 2 for m in MARGINS])
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(label_smoothing=0.5), "label_smoothing"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vrpo_loss(PC, PR, RC, RR, **kwargs)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="same shape"):
        vrpo_loss(PC, PR, RC, RR[:1])
    with pytest.raises(ValueError, match=r"must be \[B\]"):
        vrpo_loss(PC[None, None], PR, RC, RR)


def test_mdm_sft_loss_is_negative_elbo_per_token():
    est = torch.tensor([-10.0, -30.0])
    lengths = torch.tensor([5, 10])
    assert mdm_sft_loss(est, lengths).item() == pytest.approx((2.0 + 3.0) / 2)
    terms = torch.tensor([[-8.0, -12.0], [-20.0, -40.0]])
    assert mdm_sft_loss(terms, lengths).item() == pytest.approx((2.0 + 3.0) / 2)
