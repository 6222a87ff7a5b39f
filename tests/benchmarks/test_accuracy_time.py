"""``python -m benchmarks.accuracy_time``: the methods are the runs they claim to be, and a --quick run writes its
graded curve, table and plot, then skips what the CSV already holds."""

from __future__ import annotations

import dataclasses

from benchmarks import accuracy_time
from vrpo.tasks.sort import task as sort_task


def fields(method: str) -> dict:
    return dataclasses.asdict(accuracy_time.config_of(method, 42, "x", quick=False))


def differences(a: str, b: str) -> dict:
    x, y = fields(a), fields(b)
    return {k: (x[k], y[k]) for k in x if x[k] != y[k]}


def test_the_ablation_arms_differ_only_in_their_estimator():
    """Catches an arm that changes more than the masks or the likelihood (then it is not at equal rollouts), and
    an arm whose ratio is trivially 1 (one step per rollout batch)."""
    assert fields("grpo_it2")["num_iterations"] == 2 and fields("grpo")["num_iterations"] == 1
    assert differences("grpo_it2", "grpo_it2_independent") == {"antithetic": (True, False)}
    assert differences("grpo_it2", "grpo_it2_one_step") == {"likelihood": ("elbo", "one_step")}
    dpo = fields("dpo")
    assert (
        dpo["algorithm"] == "naive_dpo"
        and dpo["per_device_train_batch_size"] == 8 * sort_task.PRESETS["per_device_train_batch_size"]
    )


def test_a_quick_run_writes_the_curve_and_skips_it_the_second_time(tmp_path, monkeypatch, capsys):
    real = sort_task.test_prompts
    monkeypatch.setattr(sort_task, "test_prompts", lambda n=64: real(64))
    args = ["--quick", "--methods", "vrpo", "--seeds", "1", "--points", "2", "--out", str(tmp_path)]
    rows = accuracy_time.main(args)
    assert [(r["method"], r["step"]) for r in rows] == [("vrpo", 0), ("vrpo", 1), ("vrpo", 2)]
    assert rows[0]["train_s"] == 0 and 0 < rows[1]["train_s"] < rows[2]["train_s"]
    assert all(0 <= r["gen_acc"] <= 1 for r in rows)
    table = (tmp_path / "accuracy_time.md").read_text()
    assert "| VRPO | 1 | 2 |" in table
    assert (tmp_path / "accuracy_time.png").stat().st_size > 0
    assert accuracy_time.main(args) == rows
    assert "skip vrpo seed 1: already in" in capsys.readouterr().out
