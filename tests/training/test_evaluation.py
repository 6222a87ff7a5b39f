"""Which prompts a run grades its generations on: the task's test prompts, or its dev prompts for tuning."""

from __future__ import annotations

from types import SimpleNamespace

from accelerate.utils import DistributedType

from vrpo.training.evaluation import grade_generations
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
