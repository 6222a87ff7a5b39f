"""Crash-safe checkpoints: written to a temporary directory, renamed into place, ``latest`` last.

A run killed at any moment leaves either a complete checkpoint or a ``.tmp-*`` directory that is
ignored (and cleaned up by the next save). ``latest`` is a one-line file naming the newest complete
checkpoint; it is replaced atomically after the rename, so it never points at a partial one.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def atomic_write_text(path: str, text: str):
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a partial one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Checkpoints under ``<output_dir>/checkpoints``.

    Args:
        output_dir: the run's directory.
        accelerator: an ``accelerate.Accelerator``; its ``save_state``/``load_state`` hold the model,
            optimizer, scheduler and RNG states, for every distribution backend.
        save_total_limit: complete checkpoints kept; older ones are deleted after a successful save.
    """

    def __init__(self, output_dir: str, accelerator, save_total_limit: int = 2):
        self.root = os.path.join(output_dir, "checkpoints")
        self.accelerator = accelerator
        self.save_total_limit = save_total_limit

    @property
    def latest_file(self) -> str:
        return os.path.join(self.root, "latest")

    def complete(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = [n for n in os.listdir(self.root) if n.startswith(CHECKPOINT_PREFIX)]
        names = [n for n in names if os.path.isfile(os.path.join(self.root, n, STATE_FILE))]
        return [os.path.join(self.root, n) for n in sorted(names)]

    def latest(self) -> str | None:
        if os.path.isfile(self.latest_file):
            with open(self.latest_file, encoding="utf-8") as f:
                name = f.read().strip()
            path = os.path.join(self.root, name)
            if os.path.isfile(os.path.join(path, STATE_FILE)):
                return path
        done = self.complete()  # the pointer is missing or stale: fall back to the newest complete one
        return done[-1] if done else None

    def resolve(self, spec: str) -> str:
        """``'latest'`` or a path -> a complete checkpoint directory. Raises FileNotFoundError/ValueError."""
        if spec == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(
                    f"--resume_from_checkpoint latest: no complete checkpoint under {self.root}"
                )
            return path
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"--resume_from_checkpoint {spec}: no such directory")
        if not os.path.isfile(os.path.join(spec, STATE_FILE)):
            raise ValueError(f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {STATE_FILE})")
        return spec

    def save(self, step: int, state: dict, fault=None, extra_tensors: dict | None = None) -> str:
        """Save everything for ``step``; every process calls this. Returns the checkpoint path.

        ``state`` (JSON) is written last: a directory without it is incomplete. ``extra_tensors`` maps
        file names to tensors (None values are skipped) saved beside it. ``fault`` is a test hook
        called in the middle of the write.
        """
        acc = self.accelerator
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}")
        if acc.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            for leftover in os.listdir(self.root):
                if leftover.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, leftover), ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(output_dir=tmp)
        if fault is not None:
            fault()
        acc.wait_for_everyone()
        if acc.is_main_process:
            for fname, tensor in (extra_tensors or {}).items():
                if tensor is not None:
                    torch.save(tensor.cpu(), os.path.join(tmp, fname))
            atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1))
            if os.path.exists(final):  # a re-run of the same step after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.latest_file, name + "\n")
            for old in self.complete()[: -self.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str) -> dict:
        """Restore model, optimizer, scheduler and RNG states from ``path``; return the trainer state."""
        self.accelerator.load_state(path)
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            return json.load(f)
