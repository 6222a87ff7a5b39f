"""A run's logs: metrics as JSON Lines (always) and TensorBoard (optional), the window of step metrics
between two log records, and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..errors import RunLogError
from ..files import atomic_write_text

logger = logging.getLogger("vrpo")

METRICS_FILE = os.path.join("logs", "metrics.jsonl")
TENSORBOARD_DIR = os.path.join("logs", "tensorboard")


def records_until(path: str, step: int) -> list[str]:
    """The lines of a metrics log up to ``step``. A torn last line (the run was killed while writing it)
    is dropped; any other line that is not a JSON record is a :class:`~vrpo.errors.RunLogError` naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    kept = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                logger.warning("%s:%d: dropping a torn last line (the run stopped while writing it)", path, n)
                break
            raise RunLogError(f"{path}:{n}: not a JSON record; repair or delete the log to resume") from None
        if not isinstance(record, dict):
            raise RunLogError(f"{path}:{n}: not a JSON object; repair or delete the log to resume")
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsLogger:
    """JSONL (always) and TensorBoard (optional) logs under ``<output_dir>/logs``; main process only.

    On resume, records after the resumed step are dropped so that the log reads as one clean run.
    """

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.writer = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            atomic_write_text(self.path, "".join(records_until(self.path, resume_step)))
        elif os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            self.writer = SummaryWriter(
                os.path.join(output_dir, TENSORBOARD_DIR),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


@dataclass
class LogWindow:
    """Step metrics and tokens since the last log record."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0
    t0: float = field(default_factory=time.time)

    def add(self, metrics: dict, tokens: int):
        self.tokens += tokens
        for key, v in metrics.items():
            self.metrics.setdefault(key, []).append(v)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.time() - self.t0, 1e-9)

    def record(self, skipped_steps: int) -> dict:
        """The window's means (non-finite ones left out), throughput and skips; then start a new window."""
        out = {k: sum(v) / len(v) for k, v in self.metrics.items() if v and all(math.isfinite(x) for x in v)}
        out["train/tokens_per_s"] = self.tokens_per_s()
        out["train/skipped_steps"] = skipped_steps
        self.metrics, self.tokens, self.t0 = {}, 0, time.time()
        return out


class Progress:
    """The run's progress bar (main process only): steps done, and after an applied step the algorithm's
    figures (``fields``: ``{label: (metric, format)}``) with the window's tokens per second."""

    def __init__(self, total: int, initial: int, desc: str, fields: dict[str, tuple[str, str]], enabled: bool):
        self.fields = fields
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)

    def step(self, metrics: dict, applied: bool, tokens_per_s: float):
        self.bar.update(1)
        if applied:
            figures = {k: format(metrics[m], f) for k, (m, f) in self.fields.items()}
            self.bar.set_postfix(**figures, tok_s=f"{tokens_per_s:.0f}")

    def close(self):
        self.bar.close()
