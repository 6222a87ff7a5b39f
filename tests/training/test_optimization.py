"""The optimizer built from the flags, and the guard before an update: which steps are skipped, and clipping."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from vrpo.training.config import parse_config
from vrpo.training.optimization import build_optimizer, clip_and_agree


def _params(grad):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor(grad, dtype=torch.float32)
    return [p]


def test_the_flags_reach_adamw_and_its_schedule():
    cfg = parse_config(
        ["--learning_rate", "0.1", "--adam_beta1", "0.8", "--adam_epsilon", "1e-6", "--weight_decay", "0.5"]
        + ["--warmup_steps", "4", "--lr_scheduler_type", "linear"]
    )
    optimizer, scheduler = build_optimizer(_params([0.0, 0.0, 0.0]), cfg, max_steps=8)
    group = optimizer.param_groups[0]
    assert (group["betas"][0], group["eps"], group["weight_decay"]) == (0.8, 1e-6, 0.5)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # Linear warmup over 4 steps to the peak, then linear decay to 0 at step 8.
    assert lrs == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.075, 0.05, 0.025])


@pytest.mark.parametrize(
    "grad, lr, bad_loss, skipped",
    [
        ([3.0, 4.0, 0.0], 1e-3, False, False),
        ([3.0, 4.0, 0.0], 1e-3, True, True),  # the loss was not finite on this process
        ([math.inf, 0.0, 0.0], 1e-3, False, True),
        ([math.nan, 0.0, 0.0], 1e-3, False, True),
        ([3.0, 4.0, 0.0], math.nan, False, True),  # a schedule that went wrong is not stepped with
    ],
)
def test_a_step_is_skipped_when_anything_is_not_finite(grad, lr, bad_loss, skipped):
    params = _params(grad)
    optimizer = torch.optim.AdamW(params)
    optimizer.param_groups[0]["lr"] = lr  # AdamW refuses a NaN at construction; a schedule can make one
    bad, norm = clip_and_agree(Accelerator(cpu=True), optimizer, params, 1.0, bad_loss)
    assert bad is skipped
    if math.isfinite(sum(grad)):
        assert norm == pytest.approx(5.0)  # the norm before clipping, as TRL and transformers log it


def test_clipping_to_max_grad_norm_and_none_at_zero():
    params = _params([3.0, 4.0, 0.0])
    clip_and_agree(Accelerator(cpu=True), torch.optim.AdamW(params), params, 1.0, False)
    assert params[0].grad.norm().item() == pytest.approx(1.0, rel=1e-6)
    params = _params([3.0, 4.0, 0.0])
    clip_and_agree(Accelerator(cpu=True), torch.optim.AdamW(params), params, 0.0, False)
    assert params[0].grad.tolist() == [3.0, 4.0, 0.0]
