"""``python -m vrpo.plan --probe_steps K`` on the tiny demo: K real steps, then the budget advice."""

from __future__ import annotations

import re

from vrpo.plan import main

SMALL = [
    "--task",
    "sort",
    "--per_device_train_batch_size",
    "4",
    "--n_t",
    "4",
    "--eval_size",
    "16",
    "--warmup_steps",
    "1",
]


def test_probe_steps_prints_the_advice(capsys):
    """Catches a probe that runs no step (no variances: an error), and a report without the advised n_t."""
    assert main(["--probe_steps", "4", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "Budget advice from 4 probe steps (batch 4, n_t = 4, n_yt = 1)" in out
    mask, pairs = map(float, re.search(r"mask part \(one pair's estimate\) (\S+), pair part (\S+)", out).groups())
    assert mask > 0 and pairs >= 0
    assert re.search(r"n_t = 1: \S+, n_t = 2: \S+, n_t = 4: \S+, n_t = 8: \S+, n_t = 16: \S+", out)
    assert re.search(
        r"at this budget \(16 forward passes per step\), (n_t = \d+ with batch \d+ gives|the run's n_t)", out
    )


def test_probe_steps_needs_two_timesteps(capsys):
    assert main(["--task", "sort", "--probe_steps", "1", "--n_t", "1"]) == 2
    assert "--probe_steps needs --n_t >= 2" in capsys.readouterr().err
    assert main(["--task", "sort", "--probe_steps", "1", "--naive_dpo"]) == 2
    assert main(["--task", "sort", "--probe_steps", "400"]) == 2  # the demo runs 300 steps
    assert "more than the run's 300 steps" in capsys.readouterr().err


def test_probe_at_the_reference_says_why_it_cannot_advise(capsys):
    """Within the warm-up the policy is still the reference: every antithetic score is 0 and the probe says so
    instead of advising from zeros."""
    assert main(["--probe_steps", "2", *SMALL[:-2]]) == 2
    assert "the policy has not left the reference yet" in capsys.readouterr().err
