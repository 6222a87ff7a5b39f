"""Shared test settings.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here, first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

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

torch.set_num_threads(min(2, torch.get_num_threads()))

from .helpers import FIXTURES  # noqa: E402


@pytest.fixture
def fixtures_dir():
    """``tests/fixtures``: the tiny checkpoints and real-release metadata."""
    return FIXTURES
