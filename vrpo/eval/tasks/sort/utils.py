"""The sorting tasks' functions for lm-eval's ``!function`` (defined in :mod:`vrpo.eval.sort_tasks`)."""

from vrpo.eval.sort_tasks import load_gen, load_mc, process_gen

__all__ = ["load_gen", "load_mc", "process_gen"]
