"""Deprecated alias of :mod:`vrpo.models.samplers` (moved in 0.2; this alias goes in 0.3)."""

import warnings

from .models.samplers import *  # noqa: F403
from .models.samplers import SAMPLERS, generate, generate_dream, sample  # noqa: F401

warnings.warn(
    "vrpo.generate moved to vrpo.models.samplers (also exported by vrpo.models); the alias goes in vrpo 0.3",
    DeprecationWarning,
    stacklevel=2,
)
