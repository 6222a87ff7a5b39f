"""Reading and writing the small files vrpo keeps (configs, run state, logs): one JSON reader, one atomic
writer, so every file a run writes is either the old version or the new one, never a torn one."""

from __future__ import annotations

import json
import os


def read_json(file: str | os.PathLike, error: type[Exception] = ValueError, advice: str = ""):
    """The JSON value in ``file``. A file that is not valid JSON (or not UTF-8) raises ``error`` naming it,
    followed by ``advice`` (e.g. ``"; the checkpoint is corrupt"``)."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{os.fspath(file)}: not valid JSON ({e}){advice}") from None


def atomic_write_text(path: str | os.PathLike, text: str):
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str | os.PathLike):
    """Make a rename inside ``path`` durable (where the platform has directory file descriptors)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
