"""Tasks are plug-ins: what a run needs from a task with a verifier, and nothing about any one task.

A task brings a starting model and preference pairs (used when the run names none; an online RL run answers
their prompts), the presets its model trains with, and a verifier that rewards answers and grades the policy's
generations on the task's own test prompts before and
after training. Only the entry points choose a task (``python -m vrpo.train --task NAME``, one of
:data:`vrpo.tasks.TASKS`; long sorting by default); the trainer takes one, or none, as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerationReport:
    """Generation quality on a task's test prompts: exact accuracy, mean partial credit, and the graded
    samples (``{"prompt", "answer", "correct", "credit"}``)."""

    accuracy: float
    credit: float
    samples: list[dict]


def generation_metrics(report: GenerationReport) -> dict[str, float]:
    """A generation report as logged metrics."""
    return {"eval/gen_acc": report.accuracy, "eval/gen_credit": report.credit}


@runtime_checkable
class GradedTask(Protocol):
    """A task with a verifier.

    Attributes:
        name: for messages (``"sorting"``).
        presets: values for the config fields left at ``None`` when the run trains the task's own model
            (its learning rate, batch size, ...): they replace the paper's, sized for a real checkpoint.
        online_presets: the values that differ for an online RL run (``--algorithm grpo``) of the task's
            model, over ``presets``.
    """

    name: str
    presets: Mapping[str, object]
    online_presets: Mapping[str, object]

    def model_path(self) -> str:
        """The checkpoint directory a run starts from when it names no ``--model_name_or_path``."""

    def tokenizer(self):
        """The task model's tokenizer (with a mask token)."""

    def pairs_path(self) -> str:
        """The preference pairs a run trains on when it names no ``--dataset``."""

    def test_prompts(self) -> list[str]:
        """The fixed prompts on which generations are graded (never used to choose a setting)."""

    def dev_prompts(self) -> list[str]:
        """Fixed prompts for choosing settings (``--gen_eval_split dev``), none of them a test prompt."""

    def evaluate(self, model, tokenizer, prompts: Sequence[str]) -> GenerationReport:
        """One answer per prompt from ``model``, graded by the verifier."""

    def reward(self, prompt: str, answer: str) -> float:
        """The verifier's reward of ``answer`` (decoded text, up to its end-of-turn) to ``prompt``."""

    def answer_length(self, tokenizer, prompt: str) -> int | None:
        """Tokens a rollout generates for ``prompt`` (the task's own sampler's length), or None for
        ``--gen_length``."""

    def describe(self, sample: dict) -> str:
        """One graded sample as a line of the closing summary."""
