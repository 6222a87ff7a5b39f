"""Tasks with verifiers, as plug-ins of the training layer (:class:`vrpo.training.GradedTask`). Only the entry
points choose one, by name (``python -m vrpo.train --task NAME``; :data:`TASKS`): sorting long lists
(:mod:`vrpo.tasks.sort_long`, the default) or the short sorting demo (:mod:`vrpo.tasks.sort`)."""

from ..training.task import GradedTask
from .sort import SORT_TASK
from .sort_long import SORT_LONG_TASK

TASKS: dict[str, GradedTask] = {"sort": SORT_TASK, "sort_long": SORT_LONG_TASK}  # --task's choices


def get_task(name: str) -> GradedTask:
    """The task registered as ``name``; ``ValueError`` naming ``--task`` and the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]
