"""Shared test settings.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here, first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the README's `-n auto`) every worker is one core's worth of work: one thread each, for
# the worker and for the runs it starts in subprocesses, so that N workers do not ask for N x cores threads.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Deterministic property tests: the same examples on every run, no deadline on a noisy CPU.
settings.register_profile(
    "vrpo",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("vrpo")

torch.set_num_threads(1 if XDIST_WORKER else min(2, torch.get_num_threads()))

from .helpers import FIXTURES  # noqa: E402


@pytest.fixture
def fixtures_dir():
    """``tests/fixtures``: the tiny checkpoints and real-release metadata."""
    return FIXTURES


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, so that under ``-n`` no worker starts a minute-long run at the end
    while the others sit idle (a stable sort: the order within each group is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 8 (each holds torch and a tiny model; the end-to-end tests
    start subprocesses of their own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))
