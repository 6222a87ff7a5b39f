"""Crash-safe checkpoints: written to a temporary directory, renamed into place, ``latest`` last.

A run killed at any moment leaves either a complete checkpoint or a ``.tmp-*`` directory that is
ignored (and cleaned up by the next save). ``latest`` is a one-line file naming the newest complete
checkpoint; it is replaced atomically after the rename, so it never points at a partial one.

Checkpoints are shared and downloaded, so resuming treats them as untrusted: nothing in them is
unpickled with ``weights_only=False``. State registered with ``accelerator.register_for_checkpointing``
(the LR scheduler) is written as JSON rather than accelerate's pickle, and before accelerate reads a
checkpoint every file is checked: JSON parses, safetensors headers cover their files, and every other
file loads under ``torch.load(weights_only=True)``. A file that fails is a :class:`CheckpointError`
naming it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil

import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from safetensors import safe_open
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from ..errors import CheckpointError, TrainingDiverged
from ..files import atomic_write_text, fsync_dir, read_json

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
CUSTOM_STATE = "custom_state_{}.json"  # state of the i-th object registered for checkpointing
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}\d+$")
_ACCELERATE_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def read_state(path: str) -> dict:
    """The trainer state of checkpoint ``path``: a JSON object with an integer ``step``."""
    file = os.path.join(path, STATE_FILE)
    state = read_json(file, CheckpointError, "; the checkpoint is corrupt")
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{file}: expected a JSON object with a non-negative integer 'step', got {state!r:.80}")
    return state


def _check_safetensors(file: str):

    try:  # safetensors checks that the header's offsets cover the file exactly
        with safe_open(file, framework="pt") as f:
            f.keys()
    except Exception as e:  # the Rust binding raises SafetensorError, or OSError for I/O
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the checkpoint is corrupt") from None


def _accelerate_safe_globals() -> list:
    """What accelerate's own ``load`` allows under ``weights_only``: numpy arrays of its RNG states."""
    return list(TORCH_SAFE_GLOBALS)


def _check_pickle(source, file: str):
    """``source`` (a path, memory-mapped so nothing is read twice, or a buffer) loads with
    ``weights_only=True``; ``file`` names it in errors."""
    try:
        with torch.serialization.safe_globals(_accelerate_safe_globals()):
            torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, str))
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file}: refusing to unpickle it: it holds more than tensors and plain data ({reason}). "
            "A checkpoint from an untrusted source can run code this way; vrpo never loads it"
        ) from None
    except Exception as e:  # truncation and format errors: RuntimeError, EOFError, ValueError, OSError
        raise CheckpointError(
            f"{file}: not a readable torch file ({type(e).__name__}: {e}); the checkpoint is corrupt"
        ) from None


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's ``.metadata`` (a plain pickle that torch reads with
    ``pickle.load``), allowing only the classes that describe shards."""

    ALLOWED = {
        ("pathlib", "PosixPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in self.ALLOWED
            or module == "torch"
            and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _check_sharded(folder: str):
    """A torch.distributed.checkpoint folder (FSDP's sharded state): its ``.metadata`` holds only shard
    descriptions, and the non-tensor items of its ``.distcp`` files (which torch loads with
    ``weights_only=False``) load with ``weights_only=True``; each shard file covers its items."""

    file = os.path.join(folder, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
        storage, items = metadata.storage_data, metadata.state_dict_metadata
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refusing to unpickle it ({e}); vrpo never loads it") from None
    except Exception as e:  # truncation and format errors
        raise CheckpointError(f"{file}: not a readable shard index ({type(e).__name__}: {e})") from None
    for index, info in storage.items():
        shard = os.path.join(folder, str(info.relative_path))
        if os.path.dirname(os.path.realpath(shard)) != os.path.realpath(folder) or not os.path.isfile(shard):
            raise CheckpointError(f"{file}: names shard {info.relative_path!r}, which is not a file beside it")
        if info.offset + info.length > os.path.getsize(shard):
            raise CheckpointError(f"{shard}: truncated (item {index.fqn!r} ends past the end of the file)")
        if isinstance(items.get(index.fqn), BytesStorageMetadata):
            with open(shard, "rb") as f:
                f.seek(info.offset)
                _check_pickle(io.BytesIO(f.read(info.length)), f"{shard} (item {index.fqn!r})")


def verify_checkpoint(path: str) -> dict:
    """Check every file of checkpoint ``path`` without running anything in it; return its trainer state.

    Raises :class:`CheckpointError` naming the first bad file.
    """
    state = read_state(path)
    for folder, _, files in os.walk(path):
        for name in sorted(files):
            file = os.path.join(folder, name)
            if _ACCELERATE_PICKLE.match(name):
                raise CheckpointError(
                    f"{file}: accelerate's pickled custom state is not loaded (it would be unpickled with "
                    f"weights_only=False); vrpo writes {CUSTOM_STATE.format('<i>')} instead"
                )
            if name.endswith(".json"):
                if name != STATE_FILE:
                    read_json(file, CheckpointError, "; the checkpoint is corrupt")
            elif name.endswith(".safetensors"):
                _check_safetensors(file)
            elif name == ".metadata":
                _check_sharded(folder)
            elif name.endswith(".distcp"):
                if not os.path.isfile(os.path.join(folder, ".metadata")):
                    raise CheckpointError(f"{file}: a shard without the .metadata that describes it")
            else:
                _check_pickle(file, file)
    return state


def _check_model_shapes(path: str, models: list):
    """The checkpoint's model tensors have the shapes of the run's models (before they are loaded)."""
    for i, model in enumerate(models):
        file = os.path.join(path, f"model{f'_{i}' if i else ''}.safetensors")
        if not os.path.exists(file):
            continue
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {shape}, but this run's model has {expected[key]}"
                    )


def _check_optimizer_shapes(path: str, optimizers: list):
    """The loaded optimizer state has the shapes of its parameters (``load_state_dict`` does not check)."""
    for i, opt in enumerate(optimizers):
        file = os.path.join(path, f"optimizer{f'_{i}' if i else ''}.bin")
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise CheckpointError(
                        f"{file}: optimizer state {key!r} has shape {tuple(value.shape)}, but its parameter has "
                        f"{tuple(p.shape)}"
                    )


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

    @staticmethod
    def name(step: int) -> str:
        """The directory name of ``step``'s checkpoint."""
        return f"{CHECKPOINT_PREFIX}{step:08d}"

    @property
    def latest_file(self) -> str:
        return os.path.join(self.root, "latest")

    def complete(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not os.path.isdir(self.root):
            return []
        root = os.path.realpath(self.root)
        names = [n for n in os.listdir(self.root) if _NAME.match(n)]
        names = [
            n
            for n in names
            if os.path.isfile(os.path.join(self.root, n, STATE_FILE))
            and os.path.dirname(os.path.realpath(os.path.join(self.root, n))) == root
        ]  # no links out
        return [os.path.join(self.root, n) for n in sorted(names)]

    def latest(self) -> str | None:
        """The checkpoint ``latest`` names (it must be one inside :attr:`root`), else the newest complete one."""
        if os.path.isfile(self.latest_file):
            path = os.path.join(self.root, self._latest_name())
            if os.path.isfile(os.path.join(path, STATE_FILE)):
                return path
        done = self.complete()  # the pointer is missing or stale: fall back to the newest complete one
        return done[-1] if done else None

    def _latest_name(self) -> str:
        with open(self.latest_file, "rb") as f:
            raw = f.read(4096)
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.latest_file}: not a checkpoint name (binary data); delete it to use the newest checkpoint"
            ) from None
        inside = os.path.realpath(os.path.join(self.root, name))
        if not _NAME.match(name) or os.path.dirname(inside) != os.path.realpath(self.root):
            raise CheckpointError(
                f"{self.latest_file}: names {name[:100]!r}, not a {CHECKPOINT_PREFIX}N directory inside {self.root}"
            )
        return name

    def resolve(self, spec: str) -> str:
        """``'latest'`` or a path -> a complete checkpoint directory. Raises FileNotFoundError/ValueError."""
        if spec == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint under {self.root}")
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
        name = self.name(step)
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}")
        if acc.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            for leftover in os.listdir(self.root):
                if leftover.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, leftover), ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(output_dir=tmp)
        if acc.is_main_process:
            self._custom_states_to_json(tmp)
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
            fsync_dir(self.root)
            atomic_write_text(self.latest_file, name + "\n")
            for old in self.complete()[: -self.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _custom_states_to_json(self, folder: str):
        """Replace accelerate's pickles of the registered objects with JSON of their state dicts."""
        for i, obj in enumerate(self.accelerator._custom_objects):
            try:
                text = json.dumps(obj.state_dict(), indent=1)
            except TypeError as e:
                raise TypeError(
                    f"the state of {type(obj).__name__} (registered for checkpointing) is not JSON: {e}"
                ) from None
            atomic_write_text(os.path.join(folder, CUSTOM_STATE.format(i)), text)
            os.remove(os.path.join(folder, f"custom_checkpoint_{i}.pkl"))

    def load(self, path: str) -> dict:
        """Restore model, optimizer, scheduler and RNG states from ``path``; return the trainer state.

        Every file is verified first (:func:`verify_checkpoint`); nothing is unpickled beyond tensors
        and plain data. Raises :class:`CheckpointError` naming a bad file.
        """
        acc = self.accelerator
        state = verify_checkpoint(path)
        customs = acc._custom_objects
        for i in range(len(customs)):
            if not os.path.isfile(os.path.join(path, CUSTOM_STATE.format(i))):
                raise CheckpointError(f"{path}: no {CUSTOM_STATE.format(i)} (the LR scheduler's state)")
        acc._custom_objects = []  # read below from JSON, not by accelerate's weights_only=False load
        try:
            _check_model_shapes(path, [acc.unwrap_model(m) for m in acc._models])
            acc.load_state(path, load_kwargs={"weights_only": True})
        finally:
            acc._custom_objects = customs
        _check_optimizer_shapes(path, acc._optimizers)
        for i, obj in enumerate(customs):
            file = os.path.join(path, CUSTOM_STATE.format(i))
            try:
                obj.load_state_dict(read_json(file, CheckpointError, "; the checkpoint is corrupt"))
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{file}: not the state of a {type(obj).__name__} ({e})") from None
        return state

    def roll_back(self, step: int, scheduler) -> str:
        """The update of ``step`` made weights non-finite: restore the weights and optimizer state of the latest
        checkpoint (never written from non-finite weights), keeping ``scheduler`` where it is; returns that
        checkpoint. Keeping a copy to undo one step would cost the weights and optimizer state again in memory
        at every step; this costs nothing until it happens, and then the steps since that checkpoint."""
        last = self.latest()
        if last is None:
            raise TrainingDiverged(
                f"step {step}: the update made weights non-finite and there is no checkpoint "
                "to go back to; lower --learning_rate"
            )
        schedule = scheduler.state_dict()
        self.load(last)
        scheduler.load_state_dict(schedule)
        return last
