"""Sorting longer lists: 8 to 16 digits (``"sort 5 2 8 1 9 0 3 3"``), so that an answer is 17 to 33 tokens.

The sorting demo (:mod:`vrpo.tasks.sort`) lives in one regime: short answers, whose ELBO has little mask
noise, and preference pairs whose chosen answer is always exactly right, so that SFT on it is rejection
sampling fine-tuning. This task is the other one, where preference optimisation has a reason to exist
(LLaDA 1.5, Section 3: the score's variance from the masks grows with the answer; Table 2): long answers,
and pairs ranked by the verifier's partial credit whose chosen answer is better than the rejected one but
mostly not right. Its SFT model sorts with moderate partial credit and rarely exactly.

Everything but the lengths, the files and the pairing rule is the demo's: the verifier (:func:`grade`), the
prompts' form, LLaDA's sampler, the builders (``python -m vrpo.tasks.sort_long sft|pairs``, rebuilt bit for
bit as the demo's are) and the graded task (:class:`SortLongTask`, a :class:`~vrpo.tasks.sort.SortTask`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

from ..sort import task as sort

LENGTHS = (8, 16)  # a prompt has 8 to 16 digits: answers of 17 to 33 response tokens (with <|eot_id|>, EOS)
PAIRING = "best_vs_worst"  # a pair: the best-graded sample, right or not, against the worst (build.rank_pair)
SFT_DIR = "sft_model"
PAIRS_FILE = "pairs.jsonl"
TEST_PROMPTS = 1024

grade = sort.grade
is_correct = sort.is_correct


@dataclass(frozen=True)
class SFTSettings(sort.SFTSettings):
    """The demo's SFT recipe on this task's lengths, stopped early. The step count was picked on the 256 dev
    prompts (greedy exact sorts / mean partial credit) as the one with the most credit while under 5% exact:
    200 steps 0% / 0.46, 400 0% / 0.68, 500 2.3% / 0.755, 600 10.5% / 0.83, 800 27% / 0.89 (each a whole
    run with its own cosine schedule; the shipped figures are in ``data/sft_model/sft_settings.json``)."""

    steps: int = 500


@dataclass(frozen=True)
class PairSettings(sort.PairSettings):
    """The demo's sampling (8 answers per prompt at temperature 1) for this task's prompts."""


def data_file(name: str) -> str:
    """Path of the task's package data file or folder ``name`` (in ``vrpo/tasks/sort_long/data/``)."""
    return str(resources.files("vrpo.tasks.sort_long") / "data" / name)


def sft_path() -> str:
    """Directory of the task's SFT model (LLaDA's format; its tokenizer is the demo's)."""
    return data_file(SFT_DIR)


def pairs_path() -> str:
    """The task's on-policy preference pairs (JSON Lines, TRL's format); statistics in ``pairs.meta.json``."""
    return data_file(PAIRS_FILE)


def dev_prompts(seed: int = SFTSettings.seed, n: int = SFTSettings.dev_prompts) -> list[str]:
    """The SFT command's dev prompts (this task's lengths)."""
    return sort.dev_prompts(seed, n, LENGTHS)


def pair_prompts(settings: PairSettings = PairSettings()) -> list[str]:
    return sort.pair_prompts(settings, LENGTHS)


def test_prompts(n: int = TEST_PROMPTS) -> list[str]:
    """The held-out test prompts, as many of each length as can be, none a prompt of the pairs or an SFT dev
    prompt (:func:`vrpo.tasks.sort.task.held_out_prompts`); never used to choose a setting."""
    return sort.held_out_prompts(n, set(pair_prompts()) | set(dev_prompts()), LENGTHS)


# The task's presets for a run on its model: the demo's, with room for the longer sequences (up to 92
# tokens), 200 steps (about 1.5 minutes on a 2-core CPU) and the learning rate that VRPO (n_t 8, SFT weight
# 1.0) took on seed 1 and the dev prompts in the study of benchmarks/study.py (of 2e-4 and 5e-4 with and
# without the SFT term, and 1e-4: benchmarks/results/budget_sort_long.md).
PRESETS = {**sort.PRESETS, "max_length": 96, "max_steps": 200, "learning_rate": 2e-4}


@dataclass(frozen=True)
class SortLongTask(sort.SortTask):
    """Sorting 8 to 16 digits as a :class:`vrpo.training.GradedTask` (the demo's verifier and sampler)."""

    name: str = "long sorting"
    presets: Mapping[str, object] = field(default_factory=lambda: dict(PRESETS))
    online_presets: Mapping[str, object] = field(default_factory=lambda: dict(sort.ONLINE_PRESETS))

    def model_path(self) -> str:
        return sft_path()

    def pairs_path(self) -> str:
        return pairs_path()

    def test_prompts(self) -> list[str]:
        return test_prompts()

    def dev_prompts(self) -> list[str]:
        """The SFT command's 256 dev prompts (never a test prompt)."""
        return dev_prompts()


SORT_LONG_TASK = SortLongTask()
