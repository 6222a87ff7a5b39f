"""Sorting 8 to 16 digits: long answers and pairs whose chosen side is mostly not right (:mod:`.task`); its
package data's builders (``python -m vrpo.tasks.sort_long``)."""

from .task import SORT_LONG_TASK, SortLongTask, grade, is_correct, test_prompts

__all__ = ["SORT_LONG_TASK", "SortLongTask", "grade", "is_correct", "test_prompts"]
