"""The bad-input corpus (tests/data/bad/): every case gets a clear, specific error or a counted skip."""

import pathlib

import pytest

from vrpo.training.config import parse_config
from vrpo.training.data import DataError, DataStats, read_preference_rows

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

    rows = [{"prompt": "sort 2 1", "chosen": "1 2", "rejected": "2 1"}, {"prompt": "sort 9 3", "chosen": "3 9", "rejected": "9 3"}]
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


@pytest.mark.parametrize(
    "name, message",
    [
        ("config_bad_n_t.yaml", "--n_t must be a positive integer, got 0"),
        ("config_bad_beta.yaml", "--beta must be > 0 and finite, got -0.1"),
        ("config_bad_loss_type.yaml", "--loss_type must be one of sigmoid, ipo, hinge, robust, got 'kto'"),
        ("config_bad_estimator.yaml", "--estimator must be one of l_uniform, t_bernoulli, got 'uniform'"),
        ("config_not_yaml.yaml", "not valid YAML"),
        ("config_unknown_field.yaml", "unknown field"),
    ],
)
def test_bad_configs_are_clear_errors(name, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(BAD / name)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n_t", "-1"], "--n_t must be a positive integer"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--loss_type", "nope"], "--loss_type must be one of"),
        (["--estimator", "x"], "--estimator must be one of"),
    ],
)
def test_bad_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(flags)
    assert message in capsys.readouterr().err
