"""The sorting demo: sort a short list of digits, with a verifier (:mod:`.task`); its package data's builders
(:mod:`.build`, ``python -m vrpo.tasks.sort``)."""

from .task import SORT_TASK, SortTask, grade, is_correct, make_pairs, test_prompts

__all__ = ["SORT_TASK", "SortTask", "grade", "is_correct", "make_pairs", "test_prompts"]
