"""Which prompts a run grades its generations on: the task's test prompts, or its dev prompts for tuning."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from accelerate.utils import DistributedType

from vrpo.training.evaluation import check_split, grade_generations
from vrpo.training.task import GenerationReport


class RecordingTask:
    def __init__(self):
        self.graded = None

    def test_prompts(self):
        return ["t1", "t2", "t3"]

    def dev_prompts(self):
        return ["d1", "d2", "d3"]

    def evaluate(self, model, tokenizer, prompts):
        self.graded = list(prompts)
        return GenerationReport(0.0, 0.0, [])


def test_the_dev_split_grades_dev_prompts_and_the_default_the_test_ones():
    """Catches ``--gen_eval_split dev`` grading the test prompts (tuning on the test set) and the limit ignored."""
    acc = SimpleNamespace(is_main_process=True, distributed_type=DistributedType.NO, unwrap_model=lambda m: m)
    policy = SimpleNamespace(model=object())
    task = RecordingTask()
    grade_generations(task, acc, policy, None, limit=2, split="dev")
    assert task.graded == ["d1", "d2"]
    grade_generations(task, acc, policy, None)
    assert task.graded == ["t1", "t2", "t3"]


def test_the_trainer_grades_the_split_its_config_names(tmp_path, monkeypatch):
    """Catches ``--gen_eval_split`` not reaching the grading (the setting would tune on the test prompts), and a
    dev split asked of a run that has no task to grade (an error naming the flag, not a silent no-op)."""
    import pytest

    from vrpo.tasks.sort import SORT_TASK
    from vrpo.training import VRPOTrainer
    from vrpo.training.config import VRPOConfig

    seen = []
    monkeypatch.setattr("vrpo.training.trainer.grade_generations", lambda *a: seen.append(a[-2:]))
    cfg = VRPOConfig(
        max_steps=1, eval_size=0, report_to="none", output_dir=str(tmp_path), gen_eval_split="dev", gen_eval_prompts=5
    )
    VRPOTrainer(cfg, task=SORT_TASK).grade_generations()
    assert seen == [(5, "dev")]
    # A user's data is never graded: the trainer refuses a dev split before it loads anything.
    users = dataclasses.replace(cfg, dataset=str(SORT_TASK.pairs_path()), output_dir=str(tmp_path / "users"))
    with pytest.raises(ValueError, match="--gen_eval_split dev grades a task's dev prompts, but this run grades no"):
        VRPOTrainer(users, task=SORT_TASK)
    with pytest.raises(ValueError, match="has no dev_prompts"):
        check_split(object(), "dev")
    check_split(None, "test")
