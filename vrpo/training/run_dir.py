"""A run's output directory: one run per directory, never over a user's files.

A directory vrpo writes a run into carries a marker, ``.vrpo-run`` (JSON: the format version and when
the run was created), and a lock file, ``.vrpo-run.lock``, that the running process holds with
``fcntl.flock`` for the run's life. The rules (docs/guarantees.md):

- a new or empty directory becomes a run;
- a non-empty directory without the marker (and without checkpoints of an older vrpo) is a user's
  directory and is refused, even with ``--overwrite_output_dir``: vrpo never deletes files it did not write;
- ``--overwrite_output_dir`` over an older run moves that run aside to ``<dir>.old-<time>`` before the new
  run writes anything, so the new run's checkpoints can never mix with (or be rotated away by) the old ones;
- a second run on a directory that a live run holds fails at once, naming the holder's pid.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil

from ..errors import OutputDirError
from ..files import atomic_write_text
from .checkpoints import CheckpointManager
from .distributed import raise_everywhere

logger = logging.getLogger("vrpo")

MARKER = ".vrpo-run"
LOCK = ".vrpo-run.lock"
VERSION = 1
_TEMPORARIES = (".model.tmp-", ".model.old-")  # left by a kill during the final model save


def check_writable(path: str):
    """Raise ``PermissionError`` naming ``--output_dir`` unless ``path`` (or the nearest existing parent that
    would hold it) is a writable directory. Writes nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"--output_dir {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"--output_dir {path}: {probe} is not writable")


def is_run(path: str) -> bool:
    """``path`` holds a vrpo run: our marker, or (a run from before the marker) a ``checkpoints/latest``."""
    return os.path.isfile(os.path.join(path, MARKER)) or os.path.isfile(os.path.join(path, "checkpoints", "latest"))


class RunDir:
    """The locked output directory of one run (main process only). ``close`` releases the lock."""

    def __init__(self, path: str, overwrite: bool, resuming: bool):
        self.path = path
        self.moved_to: str | None = None
        self._lock_fd: int | None = None
        if os.path.isdir(path) and os.listdir(path):
            if not is_run(path):
                raise OutputDirError(
                    f"--output_dir {path} exists and holds files that are not a vrpo run (no {MARKER}); vrpo never "
                    "writes over or deletes them, even with --overwrite_output_dir. Choose a new or empty directory"
                )
            held = self._lock()  # the old run must not be live, whether we continue it or move it aside
            if overwrite and not resuming:
                self.moved_to = self._move_aside(held)
        if self._lock_fd is None:
            os.makedirs(path, exist_ok=True)
            self._lock()
        self._write_marker()
        self._remove_temporaries()

    def _lock(self) -> int:
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputDirError(
                    f"--output_dir {self.path} is in use by another vrpo run (pid {holder}); one run per directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return fd

    def _move_aside(self, held: int) -> str:
        """Rename the old run to ``<dir>.old-<time>`` (holding its lock), then lock a fresh directory."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        aside = f"{self.path.rstrip(os.sep)}.old-{stamp}"
        os.rename(self.path, aside)
        self._lock_fd = None
        os.makedirs(self.path)
        self._lock()
        os.close(held)  # the moved run's lock, released only once the new directory is ours
        return aside

    def _write_marker(self):

        marker = os.path.join(self.path, MARKER)
        if not os.path.isfile(marker):
            created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(marker, json.dumps({"version": VERSION, "created": created}) + "\n")

    def _remove_temporaries(self):
        for name in os.listdir(self.path):
            if name.startswith(_TEMPORARIES):
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    __del__ = close


def open_run(cfg, accelerator) -> tuple[RunDir | None, CheckpointManager, str | None]:
    """Lock ``cfg.output_dir`` for this run (main process: never a user's files, one run at a time, an
    overwritten run moved aside first), and find the checkpoint to resume from. Returns ``(run directory (None
    on other processes), checkpoints, resume path or None)``."""
    directory, refused = None, None
    if accelerator.is_main_process:
        try:
            directory = RunDir(cfg.output_dir, cfg.overwrite_output_dir, resuming=bool(cfg.resume_from_checkpoint))
        except OSError as e:  # someone else's files, a live run, not writable
            refused = e
    raise_everywhere(accelerator, refused)  # also the barrier: the directory is ready
    if directory is not None and directory.moved_to:
        logger.warning(
            "--overwrite_output_dir: the previous run in %s was moved to %s", cfg.output_dir, directory.moved_to
        )
    checkpoints = CheckpointManager(cfg.output_dir, accelerator, cfg.save_total_limit)
    resume_path = None
    if cfg.resume_from_checkpoint:
        resume_path = checkpoints.resolve(cfg.resume_from_checkpoint)
    elif checkpoints.complete() and not cfg.overwrite_output_dir:
        raise FileExistsError(
            f"--output_dir {cfg.output_dir} already holds checkpoints; pass --resume_from_checkpoint latest to "
            "continue that run or --overwrite_output_dir to start over"
        )
    return directory, checkpoints, resume_path
