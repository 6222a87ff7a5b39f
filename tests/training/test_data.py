"""Issue 12, hostile or careless preference data: every bad row is a file:line error or a counted skip,
user text never becomes a control token, and odd files are clear errors, not hangs or tracebacks."""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time

import numpy as np
import psutil
import pytest

from vrpo.models import pack_rows
from vrpo.models.tiny import build_tiny_tokenizer
from vrpo.models.tokenization import collate, encode_preference
from vrpo.tasks.sort.task import make_pairs
from vrpo.training.data import (
    DataError,
    DataStats,
    read_preference_rows,
    tokenize_pairs,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(vocab_size=136)


def write_rows(path, rows, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return str(path)


GOOD = {"prompt": "sort 2 1", "chosen": "1 2", "rejected": "2 1"}


def test_a_lone_surrogate_is_a_file_line_error_or_a_counted_skip(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps(GOOD)
        + '\n{"prompt": "sort \\ud800", "chosen": "1", "rejected": "2"}\n'
        + json.dumps({"prompt": "q", "chosen": [{"role": "assistant", "content": "a\udfff"}], "rejected": "b"})
        + "\n"
    )
    with pytest.raises(
        DataError, match=r"pairs\.jsonl:2: field 'prompt' is not valid Unicode \(surrogates not allowed"
    ):
        read_preference_rows(str(path))
    stats = DataStats()
    rows = read_preference_rows(str(path), on_bad_rows="skip", stats=stats)
    assert len(rows) == 1 and stats.skipped["malformed"] == 2


def test_a_row_the_tokenizer_rejects_is_named_or_skipped(tok):
    rows = [
        dict(GOOD, source="d.jsonl:1"),
        {"prompt": "a\ud800", "chosen": "1", "rejected": "2", "source": "d.jsonl:2"},
    ]
    with pytest.raises(DataError, match=r"d\.jsonl:2: the tokenizer rejects this row"):
        tokenize_pairs(rows, tok, 64, progress=False)
    stats = DataStats()
    pairs = tokenize_pairs(rows, tok, 64, stats=stats, progress=False, on_bad_rows="skip")
    assert len(pairs) == 1 and stats.skipped["malformed"] == 1


def test_skip_covers_a_two_assistant_turn_response(tmp_path, tok):
    two = {
        "prompt": "q",
        "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
        "rejected": "c",
    }
    path = write_rows(tmp_path / "pairs.jsonl", [GOOD, two])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: field 'chosen' must be one assistant message, got 2"):
        read_preference_rows(path)
    stats = DataStats()
    rows = read_preference_rows(path, on_bad_rows="skip", stats=stats)
    pairs = tokenize_pairs(rows, tok, 64, stats=stats, progress=False, on_bad_rows="skip")
    assert len(pairs) == 1 and stats.skipped["malformed"] == 1


@pytest.mark.parametrize("spelled", ["<|mdm_mask|>", "<|eot_id|>", "<|endoftext|>", "<|start_header_id|>"])
def test_text_that_spells_a_special_token_is_text(tok, spelled):
    ids_of = {
        name: tok.convert_tokens_to_ids(name)
        for name in ("<|mdm_mask|>", "<|eot_id|>", "<|endoftext|>", "<|start_header_id|>", "<|startoftext|>")
    }
    for prompt, n_messages in (
        (f"say {spelled}", 1),
        ([{"role": "system", "content": spelled}, {"role": "user", "content": f"say {spelled}"}], 2),
    ):
        ids = encode_preference(tok, {"prompt": prompt, "chosen": f"a {spelled}", "rejected": "b"})["chosen_input_ids"]
        counts = {name: ids.count(i) for name, i in ids_of.items()}
        # Only the template's own: a BOS, a header per message and the assistant's, an <|eot_id|> per
        # message and the response's, one EOS at the end, and never a mask.
        assert counts == {
            "<|mdm_mask|>": 0,
            "<|eot_id|>": n_messages + 1,
            "<|endoftext|>": 1,
            "<|start_header_id|>": n_messages + 1,
            "<|startoftext|>": 1,
        }, counts
        assert ids[-1] == ids_of["<|endoftext|>"]
        assert tok.decode(ids, skip_special_tokens=True).count(spelled) == (3 if n_messages == 2 else 2)


def test_pairs_identical_after_tokenization_are_skipped_and_counted(tok):
    rows = [
        dict(GOOD, source="d.jsonl:1"),
        {"prompt": "sort 3 1", "chosen": "1 3", "rejected": "1 3   ", "source": "d.jsonl:2"},
    ]
    stats = DataStats()
    pairs = tokenize_pairs(rows, tok, 64, stats=stats, progress=False)
    assert len(pairs) == 1 and stats.skipped["chosen_equals_rejected"] == 1


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    rows = read_preference_rows(write_rows(tmp_path / "bom.jsonl", [GOOD, GOOD], prefix=b"\xef\xbb\xbf"))
    assert len(rows) == 2
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert len(read_preference_rows(str(array))) == 1


def test_trl_implicit_prompt_rows_are_accepted(tmp_path, tok):
    user = {"role": "user", "content": "sort 2 1"}
    implicit = {
        "chosen": [user, {"role": "assistant", "content": "1 2"}],
        "rejected": [user, {"role": "assistant", "content": "2 1"}],
    }
    rows = read_preference_rows(write_rows(tmp_path / "implicit.jsonl", [implicit]))
    assert rows[0]["prompt"] == [user] and rows[0]["chosen"] == [{"role": "assistant", "content": "1 2"}]
    got = tokenize_pairs(rows, tok, 64, progress=False)
    want = tokenize_pairs([dict(GOOD, source="x")], tok, 64, progress=False)
    assert got.sequence(0, 0)["input_ids"].tolist() == want.sequence(0, 0)["input_ids"].tolist()
    unrelated = {
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    }
    with pytest.raises(DataError, match=r"implicit2\.jsonl:1: no 'prompt', and 'chosen' and 'rejected' share no"):
        read_preference_rows(write_rows(tmp_path / "implicit2.jsonl", [unrelated]))


def test_when_every_pair_is_too_long_the_error_says_so_and_suggests_max_length(tok):
    rows = [
        dict(GOOD, source="d.jsonl:1"),
        {"prompt": "sort 9 8 7 6 5", "chosen": "5 6 7 8 9", "rejected": "9", "source": "d.jsonl:2"},
    ]
    with pytest.raises(
        DataError, match=r"every pair is longer than --max_length 12 .*d\.jsonl:1, needs \d+ tokens.*raise --max_length"
    ):
        tokenize_pairs(rows, tok, 12, progress=False)


def test_a_fifo_is_a_clear_error_not_a_hang(tmp_path):
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_preference_rows(str(fifo))
        except DataError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # unblock the reader so the test run can end
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO hung")
    assert outcome and "not a regular file or directory" in outcome[0] and str(fifo) in outcome[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc")
def test_an_unreadable_dataset_is_a_clear_error(tmp_path):
    link = tmp_path / "pairs.jsonl"
    link.symlink_to("/proc/self/mem")  # a regular file whose first read fails (EIO), even for root
    with pytest.raises(DataError, match=rf"{link}: cannot be read"):
        read_preference_rows(str(link))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        read_preference_rows(str(broken))


# --- the bad-input corpus (tests/data/bad/): every case gets a clear, specific error or a counted skip

BAD = pathlib.Path(__file__).resolve().parents[1] / "data" / "bad"


@pytest.mark.parametrize(
    "name, message",
    [
        ("non_utf8.jsonl", r"non_utf8\.jsonl:2: not valid UTF-8 \(byte 0xff at column 20\)"),
        ("truncated.jsonl", r"truncated\.jsonl:2: invalid JSON"),
        ("truncated_array.json", r"truncated_array\.json:2: invalid JSON"),
        ("missing_rejected.jsonl", r"missing_rejected\.jsonl:3: missing field\(s\) 'rejected'"),
        ("missing_prompt.jsonl", r"missing_prompt\.jsonl:1: missing field\(s\) 'prompt'"),
        ("wrong_type.jsonl", r"wrong_type\.jsonl:1: field 'chosen' must be a string or a list of messages, got int"),
        ("empty_string.jsonl", r"empty_string\.jsonl:2: field 'chosen' is empty"),
        ("unknown_role.jsonl", r"unknown_role\.jsonl:2: message 0 of 'prompt' has unknown role 'robot'"),
    ],
)
def test_malformed_rows_name_file_and_line(name, message):
    with pytest.raises(DataError, match=message):
        read_preference_rows(str(BAD / name))


@pytest.mark.parametrize("name", ["non_utf8.jsonl", "truncated.jsonl", "missing_rejected.jsonl", "empty_string.jsonl"])
def test_skip_mode_drops_and_counts_malformed_rows(name):
    stats = DataStats()
    rows = read_preference_rows(str(BAD / name), on_bad_rows="skip", stats=stats)
    assert stats.skipped["malformed"] == 1
    assert len(rows) == stats.rows - 1


def test_chosen_equal_to_rejected_is_skipped_with_a_warning_and_counted(caplog):
    stats = DataStats()
    rows = read_preference_rows(str(BAD / "chosen_equals_rejected.jsonl"), stats=stats)
    assert [r["prompt"] for r in rows] == ["sort 3 1", "sort 5 1"]
    assert stats.skipped["chosen_equals_rejected"] == 1
    assert "chosen_equals_rejected.jsonl:2: chosen is identical to rejected" in caplog.text


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_preference_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        read_preference_rows(str(tmp_path / "data.csv"))


def test_a_file_of_only_bad_rows_is_an_error_not_an_empty_run(tmp_path):
    path = tmp_path / "all_equal.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(DataError, match="no usable preference pairs"):
        read_preference_rows(str(path))


def test_parquet_and_save_to_disk_sources(tmp_path):
    import datasets

    rows = [
        {"prompt": "sort 2 1", "chosen": "1 2", "rejected": "2 1"},
        {"prompt": "sort 9 3", "chosen": "3 9", "rejected": "9 3"},
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    ds.save_to_disk(str(tmp_path / "pairs_dir"))
    for source in ("pairs.parquet", "pairs_dir"):
        got = read_preference_rows(str(tmp_path / source))
        assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in got] == rows
    bad = datasets.Dataset.from_list([{"prompt": "sort 2 1", "chosen": "1 2", "rejected": ""}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet row 0: field 'rejected' is empty"):
        read_preference_rows(str(tmp_path / "bad.parquet"))


# --- load: 10,000 pairs through read -> tokenize -> collate -> pack, with flat memory


def test_ten_thousand_pairs_flow_with_flat_memory(tmp_path, record_property):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for pair in make_pairs(10_000, seed=1):
            f.write(json.dumps(pair) + "\n")
    tokenizer = build_tiny_tokenizer(vocab_size=136)
    process = psutil.Process()

    t0 = time.perf_counter()
    stats = DataStats()
    rows = read_preference_rows(str(path), stats=stats)
    pairs = tokenize_pairs(rows, tokenizer, max_length=64, stats=stats, progress=False)
    t_tokenize = time.perf_counter() - t0
    assert len(pairs) == stats.kept == 10_000 - sum(stats.skipped.values())

    def one_pass():
        pad = tokenizer.pad_token_id
        for start in range(0, len(pairs), 64):
            seqs = [pairs.sequence(i, side) for side in (0, 1) for i in range(start, min(start + 64, len(pairs)))]
            batch = collate(seqs, pad)
            lengths = batch["attention_mask"].sum(-1)
            pack_rows([batch["input_ids"][b, : lengths[b]] for b in range(len(seqs))], 256, pad)

    one_pass()  # warm: allocator pools and caches settle
    rss = [process.memory_info().rss]
    t0 = time.perf_counter()
    for _ in range(3):
        one_pass()
        rss.append(process.memory_info().rss)
    t_pass = (time.perf_counter() - t0) / 3
    growth_mb = (max(rss) - rss[0]) / 2**20
    record_property("tokenize_pairs_per_s", len(pairs) / t_tokenize)
    record_property("collate_pack_pairs_per_s", len(pairs) / t_pass)
    record_property("rss_growth_mb", growth_mb)
    print(
        f"tokenize {len(pairs) / t_tokenize:.0f} pairs/s, collate+pack {len(pairs) / t_pass:.0f} pairs/s, "
        f"RSS growth over 3 passes {growth_mb:.1f} MB"
    )
    assert growth_mb < 20, rss
    # The compact store: a few bytes per token, not Python objects per token.
    assert pairs._flat()[0].dtype == np.int32
