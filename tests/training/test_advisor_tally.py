"""The budget advisor in a run: every logged step has both variances and the advice, ``summary.json`` has them,
and the two settings of the equal-compute study (``--pref_weight``, ``--max_train_pairs``) do what they say."""

from __future__ import annotations

import json

import pytest
import torch

from vrpo.tasks.sort import SORT_TASK
from vrpo.training import VRPOTrainer
from vrpo.training.advisor_tally import ADVICE, VAR_MASK, VAR_PAIRS
from vrpo.training.config import VRPOConfig

FAST = dict(
    max_steps=3,
    per_device_train_batch_size=4,
    n_t=2,
    eval_size=16,
    num_samples=0,
    report_to="none",
    gen_eval_prompts=16,
    logging_steps=1,
    save_steps=0,
    overwrite_output_dir=True,
)


def test_every_logged_step_has_the_variances_and_the_advice(tmp_path, monkeypatch):
    """Catches a hook that logs nothing, a mask part that is not the run's score/var (the same quantity:
    sigma_mask^2 / n_t), a negative pair part, and a summary without the advice."""
    monkeypatch.setattr("vrpo.training.trainer.grade_generations", lambda *a, **k: None)  # 1024 generations: slow
    out = tmp_path / "run"
    summary = VRPOTrainer(VRPOConfig(output_dir=str(out), **FAST), task=SORT_TASK).train()
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/vrpo" in r]
    assert len(steps) == 3
    for r in steps:
        assert r[VAR_MASK] == pytest.approx(r["score/var"], rel=1e-6) and r[VAR_PAIRS] >= 0
        assert r[ADVICE] in (1, 2, 4, 8)  # batch 4 x n_t 2: 8 forward passes, so n_t 16 is not offered
    written = json.loads((out / "summary.json").read_text())
    for key in (VAR_MASK, VAR_PAIRS, ADVICE, "advice"):
        assert written[key] == summary[key]
    assert written[VAR_MASK] == pytest.approx(sum(r[VAR_MASK] for r in steps) / 3, rel=1e-6)


def test_pref_weight_zero_trains_the_sft_term_alone(tmp_path):
    """The loss of --pref_weight 0 is the SFT term times its weight; at 1 the VRPO loss is in it unscaled."""

    def loss_and_metrics(**kw):
        cfg = VRPOConfig(output_dir=str(tmp_path / str(kw)), max_train_pairs=8, **{**FAST, **kw})
        trainer = VRPOTrainer(cfg, task=SORT_TASK)
        try:
            return trainer.loss_on(trainer.micro_batches(0)[0], 0)[:2]
        finally:
            trainer.close()

    loss0, m0 = loss_and_metrics(pref_weight=0.0, sft_weight=0.5)
    loss1, m1 = loss_and_metrics(sft_weight=0.5)
    assert torch.equal(loss0.detach(), 0.5 * m0["loss/sft"])
    assert torch.equal(loss1.detach(), m1["loss/vrpo"] + 0.5 * m1["loss/sft"])


def test_max_train_pairs_keeps_a_seeded_subset(tmp_path):
    def train_hash(seed, limit):
        cfg = VRPOConfig(output_dir=str(tmp_path / f"{seed}-{limit}"), seed=seed, max_train_pairs=limit, **FAST)
        trainer = VRPOTrainer(cfg, task=SORT_TASK)
        trainer.close()
        return len(trainer.train_pairs), trainer.train_pairs.content_hash(), trainer.eval_pairs.content_hash()

    n, h, e = train_hash(1, 128)
    assert n == 128 and train_hash(1, 128) == (n, h, e)  # same seed, same subset
    n2, h2, e2 = train_hash(2, 128)
    assert h2 != h  # another seed, another subset
    full, _, e_full = train_hash(1, 10**6)  # more than there are: all of them, and the held-out split untouched
    assert full > 1000 and e_full == e
