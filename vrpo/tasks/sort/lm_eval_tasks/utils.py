"""The sorting tasks' functions for lm-eval's ``!function`` (defined in :mod:`vrpo.tasks.sort.lm_eval`)."""

from vrpo.tasks.sort.lm_eval import load_gen, load_mc, process_gen

__all__ = ["load_gen", "load_mc", "process_gen"]
