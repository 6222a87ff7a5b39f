"""Preference data: read TRL-format pairs, validate them loudly, tokenize, batch and pack.

Input: a ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``datasets.save_to_disk`` directory whose rows
have ``prompt``, ``chosen`` and ``rejected``, each either a string or a list of chat messages
(``{"role": ..., "content": ...}``), as in TRL's preference format.

Malformed rows (bad UTF-8, bad JSON, missing fields, wrong types, empty text, unknown roles) are
errors that name the file and line, unless ``on_bad_rows="skip"``, which drops them and counts the
reason. A pair whose chosen equals its rejected teaches nothing: it is skipped with a warning and
counted, always.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A preference file or row that cannot be used. The message names the file and line/row."""


@dataclass
class DataStats:
    """What happened to the rows of a dataset; ``skipped`` counts reasons."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


def _check_text_or_messages(value, name: str, where: str, assistant_only: bool):
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        return
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field '{name}' must be a string or a list of messages, got {type(value).__name__}"
        )
    if not value:
        raise DataError(f"{where}: field '{name}' is an empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} of '{name}' must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} of '{name}' has unknown role {role!r} (expected one of {ROLES})")
        if assistant_only and role != "assistant":
            raise DataError(f"{where}: message {i} of '{name}' has role {role!r}; responses must be 'assistant' turns")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} of '{name}' has content of type {type(content).__name__}, expected a string"
            )
        if not content.strip():
            raise DataError(f"{where}: message {i} of '{name}' has empty content")


def validate_row(row, where: str) -> dict:
    """Check one row; return ``{"prompt", "chosen", "rejected"}``. Raises :class:`DataError`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {FIELDS}, got {type(row).__name__}")
    missing = [f for f in FIELDS if row.get(f) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}")
    _check_text_or_messages(row["prompt"], "prompt", where, assistant_only=False)
    _check_text_or_messages(row["chosen"], "chosen", where, assistant_only=True)
    _check_text_or_messages(row["rejected"], "rejected", where, assistant_only=True)
    if isinstance(row["prompt"], list) and row["prompt"][-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt's last message must not be an assistant turn")
    return {f: row[f] for f in FIELDS}


def _jsonl_rows(path: str):
    """Yield ``(where, row)`` from a JSON Lines file; decoding errors become DataError at their line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def _raw_rows(path: str):
    """Yield ``(where, row_or_error)`` for any supported source."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises several types for a wrong directory
            raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path} row {i}", row
        return
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix == "parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(path)
        for i, row in enumerate(ds):
            yield f"{path} row {i}", row
    elif suffix == "jsonl":
        yield from _jsonl_rows(path)
    elif suffix == "json":
        with open(path, "rb") as f:
            head = f.read(1024).lstrip()
        if head.startswith(b"["):
            try:
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 (at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            for i, row in enumerate(rows):
                yield f"{path} item {i}", row
        else:
            yield from _jsonl_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type '.{suffix}' (use .jsonl, .json, .parquet or a save_to_disk directory)")


def read_preference_rows(path: str, on_bad_rows: str = "error", stats: DataStats | None = None) -> list[dict]:
    """Read and validate every row of ``path``.

    Args:
        path: a .jsonl/.json/.parquet file or a ``save_to_disk`` directory.
        on_bad_rows: ``"error"`` raises :class:`DataError` at the first malformed row; ``"skip"`` drops
            malformed rows and counts them in ``stats.skipped["malformed"]``.
        stats: filled in with what happened (a fresh one if None).

    Returns:
        The valid rows as dicts with ``prompt``, ``chosen``, ``rejected`` (and ``source``: file:line).
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    stats = stats if stats is not None else DataStats()
    rows = []
    for where, row in _raw_rows(path):
        stats.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            clean = validate_row(row, where)
        except DataError as e:
            if on_bad_rows == "error":
                raise
            logger.warning("skipping %s", e)
            stats.skipped["malformed"] += 1
            continue
        if clean["chosen"] == clean["rejected"]:
            logger.warning("%s: chosen is identical to rejected; skipping the pair", where)
            stats.skipped["chosen_equals_rejected"] += 1
            continue
        clean["source"] = where
        rows.append(clean)
    if not rows:
        raise DataError(f"{path}: no usable preference pairs ({stats.rows} rows read, skipped: {dict(stats.skipped)})")
    return rows


class TokenizedPairs:
    """Tokenized preference pairs in flat buffers (compact: no per-token Python objects).

    Pair ``i`` has a chosen and a rejected sequence, each ``(input_ids int32 [L], response_mask bool [L])``;
    ``sources[i]`` says where the pair came from (file:line).
    """

    def __init__(self):
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._spans: list[tuple[int, int, int, int]] = []  # (chosen offset, length, rejected offset, length)
        self._offset = 0
        self.sources: list[str] = []

    def append(self, chosen_ids, chosen_mask, rejected_ids, rejected_mask, source: str):
        span = []
        for ids, mask in ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)):
            ids, mask = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.bool_)
            if ids.shape != mask.shape:
                raise ValueError(f"{source}: {ids.size} token ids but {mask.size} response-mask entries")
            self._ids.append(ids)
            self._masks.append(mask)
            span += [self._offset, ids.size]
            self._offset += ids.size
        self._spans.append(tuple(span))
        self.sources.append(source)

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._ids) != 1:  # consolidate once, then serve views
            self._ids = [np.concatenate(self._ids) if self._ids else np.zeros(0, np.int32)]
            self._masks = [np.concatenate(self._masks) if self._masks else np.zeros(0, np.bool_)]
        return self._ids[0], self._masks[0]

    def __len__(self) -> int:
        return len(self._spans)

    def sequence(self, i: int, side: int) -> dict[str, np.ndarray]:
        """``{"input_ids", "response_mask"}`` of pair ``i``'s chosen (side 0) or rejected (side 1)."""
        ids, masks = self._flat()
        offset, length = self._spans[i][2 * side : 2 * side + 2]
        return {"input_ids": ids[offset : offset + length], "response_mask": masks[offset : offset + length]}

    def subset(self, indices) -> TokenizedPairs:
        out = TokenizedPairs()
        for i in indices:
            c, r = self.sequence(i, 0), self.sequence(i, 1)
            out.append(c["input_ids"], c["response_mask"], r["input_ids"], r["response_mask"], self.sources[i])
        return out


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int, truncation: str = "skip",
                   stats: DataStats | None = None, progress: bool = True) -> TokenizedPairs:
    """Tokenize validated rows with the chat template (:func:`vrpo.tokenization.encode_preference`).

    Args:
        rows: from :func:`read_preference_rows`.
        max_length: tokens of prompt + response per sequence.
        truncation: over-long pairs are ``"skip"``-ped (counted as ``too_long``), ``"truncate"``-d (the
            prompt from the left, then the response from the right; counted as truncated) or an ``"error"``.
    """
    from tqdm.auto import tqdm

    from .tokenization import encode_preference

    stats = stats if stats is not None else DataStats()
    out = TokenizedPairs()
    for row in tqdm(rows, desc="tokenizing", disable=not progress, mininterval=2):
        example = {k: row[k] for k in FIELDS}
        try:
            enc = encode_preference(tokenizer, example, max_length=max_length, truncation="error")
        except ValueError as e:
            if "max_length" not in str(e):
                raise DataError(f"{row.get('source', '?')}: {e}") from e
            if truncation == "error":
                raise DataError(f"{row.get('source', '?')}: {e}") from e
            if truncation == "skip":
                stats.skipped["too_long"] += 1
                continue
            enc = encode_preference(tokenizer, example, max_length=max_length, truncation="truncate")
            stats.truncated += 1
        out.append(enc["chosen_input_ids"], enc["chosen_response_mask"],
                   enc["rejected_input_ids"], enc["rejected_response_mask"], row.get("source", "?"))
    stats.kept = len(out)
    if stats.skipped.get("too_long"):
        logger.warning("skipped %d pairs longer than max_length=%d", stats.skipped["too_long"], max_length)
    return out
