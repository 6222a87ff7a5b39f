"""Evaluate masked diffusion LMs with lm-evaluation-harness (``pip install -e ".[eval]"``).

Importing this package registers the lm-eval model ``vrpo`` (:class:`VRPOEvalLM`)::

    import lm_eval, vrpo.eval
    lm_eval.simple_evaluate(model="vrpo", model_args={"pretrained": PATH}, tasks=["vrpo_sort_mc"],
                            task_manager=vrpo.eval.task_manager())

or from the shell: ``python -m vrpo.eval --model_name_or_path PATH --tasks vrpo_sort_mc,vrpo_sort_gen``.
The shipped tasks (the sorting demo's, :data:`TASKS_DIRS`) come from the task plug-ins; the likelihood
estimator is :mod:`vrpo.eval.likelihood` and the lm-eval model :mod:`vrpo.eval.model` (the evaluation layer,
beside training); this package is their user-facing entry, which also knows the tasks.
"""

from lm_eval.tasks import TaskManager

from ..tasks.sort.lm_eval import TASKS_DIR as SORT_TASKS_DIR
from .likelihood import Estimate, LikelihoodEstimator, LikelihoodRequest, MCSettings
from .model import VRPOEvalLM, attach_stats

TASKS_DIRS = (SORT_TASKS_DIR,)  # lm-eval task YAMLs shipped by the task plug-ins


def task_manager(include_path: list[str] | None = None, **kwargs) -> TaskManager:
    """lm-eval's task manager with the shipped tasks (and ``include_path`` directories) added."""
    return TaskManager(include_path=[*TASKS_DIRS, *(include_path or [])], **kwargs)


__all__ = [
    "Estimate",
    "LikelihoodEstimator",
    "LikelihoodRequest",
    "MCSettings",
    "TASKS_DIRS",
    "VRPOEvalLM",
    "attach_stats",
    "task_manager",
]
