"""Every error vrpo raises on purpose, in one place, so that a caller (or the CLI) can catch them by kind.

Each names what went wrong and where (the file, line, key or flag); the command line maps them to exit
codes (``python -m vrpo.train``: 2 for bad input, 3 for a diverged run, 128 + N for signal N).
"""

from __future__ import annotations


class NonFiniteELBOError(FloatingPointError):
    """The model produced NaN/inf log-probabilities for some masked tokens."""


class CheckpointError(ValueError):
    """A checkpoint's files are unusable: weights that do not match their config (a missing, unexpected or
    wrongly shaped tensor), or a training checkpoint whose state files are corrupt or unsafe to load."""


class RunLogError(ValueError):
    """A run's metrics log cannot be continued (a line that is not a JSON record)."""


class DataError(ValueError):
    """A row of a preference dataset that cannot be used; the message names the file and line."""


class TruncationError(ValueError):
    """A pair is longer than ``max_length`` and ``truncation="error"`` was asked for."""


class OutputDirError(FileExistsError):
    """``--output_dir`` cannot be used for this run (someone else's files, or a live run holds it)."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
