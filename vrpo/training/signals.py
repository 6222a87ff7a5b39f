"""Stopping a run cleanly: SIGTERM/SIGINT ask the loop to stop after the current step with a checkpoint (a
second signal acts at once, as usual); and the test hook that kills a run at a named point."""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from ..errors import Interrupted

logger = logging.getLogger("vrpo")


def fault_point(name: str, step: int):
    """Test hook: ``VRPO_KILL_AT=<name>:<step>[:<SIGNAL>]`` sends SIGKILL (or the named signal, e.g.
    ``SIGTERM``) to this process at that point."""
    spec = os.environ.get("VRPO_KILL_AT", "")
    where, _, sig = spec.partition(":SIG")
    if spec and where == f"{name}:{step}":
        os.kill(os.getpid(), getattr(signal, "SIG" + sig) if sig else signal.SIGKILL)


class StopSignals:
    """A context manager: while it is active, SIGTERM and SIGINT are recorded (``signum``) instead of acting,
    and the previous handlers come back after the first one. Handlers can only be set from the main thread;
    elsewhere signals act as usual."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            for sig in self._previous:
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        self._restore()

    def _restore(self):
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def interrupted(self, step: int, max_steps: int, checkpoint: str | None, output_dir: str) -> Interrupted:
        """The error that stops the run at ``step`` after writing ``checkpoint``, saying how to resume."""
        return Interrupted(
            f"{self.name} at step {step}/{max_steps}; checkpoint: {checkpoint or 'none (weights not finite)'}. "
            f"Resume with the same command plus --output_dir {output_dir} --resume_from_checkpoint latest",
            self.signum,
        )

    def _handler(self, signum, frame):
        self.signum = signum
        self._restore()
        logger.warning(
            "%s: finishing the current step, then writing a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def requested(self, accelerator) -> bool:
        """A signal reached this process (or, with several processes, any of them)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([1.0 if self.signum else 0.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:
            return False
        self.signum = self.signum or signal.SIGTERM  # another process got it (a launcher forwards SIGTERM)
        return True

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
