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

import hashlib
import json
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError, TruncationError
from ..models.tokenization import check_messages, encode_preference

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class DataStats:
    """What happened to the rows of a dataset; ``skipped`` counts reasons."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


def _check_unicode(text: str, what: str, where: str):
    """JSON can spell lone surrogates (``"\\ud800"``), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: {what} is not valid Unicode ({e.reason} {text[e.start]!r} at character {e.start})"
        ) from None


def _check_text_or_messages(value, name: str, where: str, assistant_only: bool):
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        _check_unicode(value, f"field '{name}'", where)
        return

    try:
        check_messages(value, name, assistant_only)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    for i, message in enumerate(value):
        _check_unicode(message["content"], f"message {i} of '{name}'", where)


def _split_implicit_prompt(row: dict, where: str) -> dict:
    """TRL's implicit-prompt format: no ``prompt``; ``chosen`` and ``rejected`` are message lists that
    share their leading messages, which are the prompt (as TRL's ``extract_prompt`` does)."""
    chosen, rejected = row["chosen"], row["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        _check_text_or_messages(value, name, where, assistant_only=False)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no leading messages to use as one")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def validate_row(row, where: str) -> dict:
    """Check one row; return ``{"prompt", "chosen", "rejected"}``. Raises :class:`DataError`.

    A row without ``prompt`` whose ``chosen`` and ``rejected`` are message lists has an implicit prompt
    (their shared leading messages), as in TRL.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {FIELDS}, got {type(row).__name__}")
    implicit = (
        row.get("prompt") is None and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)
    )
    missing = [f for f in FIELDS if row.get(f) is None and not (implicit and f == "prompt")]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}")
    if implicit:
        row = _split_implicit_prompt(row, where)
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
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is allowed
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
    try:
        yield from _source_rows(path)
    except OSError as e:  # permissions, I/O errors: the file, not a traceback
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def _source_rows(path: str):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if not (os.path.isdir(path) or stat.S_ISREG(os.stat(path).st_mode)):
        # Reading a FIFO, socket or device would block or never end.
        raise DataError(f"{path}: not a regular file or directory (a FIFO, socket or device)")
    if os.path.isdir(path):
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
        try:
            ds = datasets.Dataset.from_parquet(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
        for i, row in enumerate(ds):
            yield f"{path} row {i}", row
    elif suffix == "jsonl":
        yield from _jsonl_rows(path)
    elif suffix == "json":
        with open(path, "rb") as f:
            head = f.read(1024).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"["):
            try:
                with open(path, encoding="utf-8-sig") as f:
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
        raise DataError(
            f"{path}: unsupported file type '.{suffix}' (use .jsonl, .json, .parquet or a save_to_disk directory)"
        )


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

    def content_hash(self) -> str:
        """sha256 of the token ids, response masks and pair boundaries: the data a run trains on."""
        ids, masks = self._flat()
        h = hashlib.sha256(ids.tobytes())
        h.update(masks.tobytes())
        h.update(np.asarray(self._spans, dtype=np.int64).tobytes())
        return h.hexdigest()

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


def _encode_row(tokenizer, example: dict, where: str, max_length: int, truncation: str, stats: DataStats):
    """``encode_preference`` of one row under the truncation policy; None when it is skipped as too long."""
    try:
        return encode_preference(tokenizer, example, max_length=max_length, truncation="error")
    except TruncationError as e:
        if truncation == "error":
            raise DataError(f"{where}: {e}") from e
    if truncation == "skip":
        return None
    stats.truncated += 1
    return encode_preference(tokenizer, example, max_length=max_length, truncation="truncate")


def tokenize_pairs(
    rows: list[dict],
    tokenizer,
    max_length: int,
    truncation: str = "skip",
    stats: DataStats | None = None,
    progress: bool = True,
    on_bad_rows: str = "error",
) -> TokenizedPairs:
    """Tokenize validated rows with the chat template (:func:`vrpo.models.tokenization.encode_preference`).

    Args:
        rows: from :func:`read_preference_rows`.
        max_length: tokens of prompt + response per sequence.
        truncation: over-long pairs are ``"skip"``-ped (counted as ``too_long``), ``"truncate"``-d (the
            prompt from the left, then the response from the right; counted as truncated) or an ``"error"``.
        on_bad_rows: a row the tokenizer rejects is an ``"error"`` naming its file and line, or ``"skip"``-ped
            and counted as ``malformed``.

    Pairs whose chosen and rejected tokenize to the same ids are skipped and counted as
    ``chosen_equals_rejected``. Raises :class:`DataError` when every pair is longer than ``max_length``.
    """

    stats = stats if stats is not None else DataStats()
    out = TokenizedPairs()
    shortest_skipped: tuple[int, str] | None = None  # (tokens, file:line) of the shortest over-long pair
    for row in tqdm(rows, desc="tokenizing", disable=not progress, mininterval=2):
        example = {k: row[k] for k in FIELDS}
        where = row.get("source", "?")
        try:
            enc = _encode_row(tokenizer, example, where, max_length, truncation, stats)
        except DataError:
            raise
        except Exception as e:  # the tokenizer's own rejections (TypeError, ValueError, its Rust Exception)
            error = DataError(f"{where}: the tokenizer rejects this row ({type(e).__name__}: {e})")
            if on_bad_rows == "error":
                raise error from e
            logger.warning("skipping %s", error)
            stats.skipped["malformed"] += 1
            continue
        if enc is None:
            stats.skipped["too_long"] += 1
            full = encode_preference(tokenizer, example)
            need = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
            shortest_skipped = min(shortest_skipped or (need, where), (need, where))
            continue
        if enc["chosen_input_ids"] == enc["rejected_input_ids"]:
            logger.warning("%s: chosen and rejected are identical after tokenization; skipping the pair", where)
            stats.skipped["chosen_equals_rejected"] += 1
            continue
        out.append(
            enc["chosen_input_ids"],
            enc["chosen_response_mask"],
            enc["rejected_input_ids"],
            enc["rejected_response_mask"],
            where,
        )
    stats.kept = len(out)
    if stats.skipped.get("too_long"):
        logger.warning("skipped %d pairs longer than max_length=%d", stats.skipped["too_long"], max_length)
        if not len(out):
            need, where = shortest_skipped
            raise DataError(
                f"every pair is longer than --max_length {max_length} ({stats.skipped['too_long']} skipped; the "
                f"shortest, {where}, needs {need} tokens): raise --max_length or pass --truncation truncate"
            )
    return out
