"""``benchmarks/common.py``: what the benchmarks share reads back what they wrote."""

from __future__ import annotations

import math

from benchmarks.common import DemoRun, read_rows, report_heading, write_csv


def test_read_rows_parses_what_write_csv_wrote(tmp_path):
    """Catches a text column parsed as a number, an int column left a float (budget's ``done`` set and
    accuracy_time's step arithmetic key on them), an empty cell read as 0 or '' instead of None, and a
    missing file that raises instead of starting an empty study."""
    path = tmp_path / "study.csv"
    assert read_rows(path) == []
    rows = [
        {"method": "42", "seed": 42, "step": 0, "acc": 0.5, "var": None},
        {"method": "grpo", "seed": 2, "step": 10, "acc": 0.75, "var": 1e-3},
    ]
    write_csv(rows, path, ("method", "seed", "step", "acc", "var"))
    back = read_rows(path, text=("method",), ints=("seed", "step"))
    assert back == rows
    assert [type(r["seed"]) for r in back] == [int, int] and type(back[0]["acc"]) is float
    floats = read_rows(path, text=("method",))  # budget's reading: every other column a float
    assert floats[1]["seed"] == 2.0 and type(floats[1]["seed"]) is float and floats[0]["var"] is None


def test_report_heading_puts_the_notes_between_the_title_and_the_command():
    lines = report_heading("Title", "python -m benchmarks.x --quick", "note one", "note two")
    assert lines[0].startswith("# Title (") and lines[1] == ""
    assert lines[2:] == ["note one", "", "note two", "", "Command: `python -m benchmarks.x --quick`", ""]
    assert report_heading("T", "cmd")[2:] == ["Command: `cmd`", ""]


def test_a_runs_mean_skips_records_without_the_metric():
    """Catches a mean over every record (the logs interleave evaluation records without ``score/var``) and
    a zero instead of NaN for a run that never logged it (naive DPO: one sample has no variance)."""
    run = DemoRun({}, [{"score/var": 0.5}, {"eval/pref_acc": 0.9}, {"score/var": 1.5}, {"score/var": None}], 1.0)
    assert run.mean("score/var") == 1.0
    assert math.isnan(run.mean("clip_ratio"))
