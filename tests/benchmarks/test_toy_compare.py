"""``python -m benchmarks.toy_compare --quick``: both methods run at equal forward passes and the table is written."""

from __future__ import annotations

import csv

import pytest

from benchmarks import toy_compare


def test_naive_dpo_gets_vrpos_forward_passes():
    vrpo = toy_compare.method_kwargs(False, "batch", None)
    by_batch = toy_compare.method_kwargs(True, "batch", None)
    by_steps = toy_compare.method_kwargs(True, "steps", None)
    assert by_batch["per_device_train_batch_size"] == 8 * vrpo["per_device_train_batch_size"]
    assert by_batch["max_steps"] == vrpo["max_steps"] and by_batch["algorithm"] == "naive_dpo"
    assert by_steps["max_steps"] == 8 * vrpo["max_steps"]
    assert by_steps["per_device_train_batch_size"] == vrpo["per_device_train_batch_size"]


@pytest.mark.slow
def test_toy_compare_quick_writes_its_table(tmp_path):
    toy_compare.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "toy_compare.csv").open()))
    assert [r["method"] for r in rows] == ["VRPO", "naive DPO"]
    for r in rows:
        for key in toy_compare.SUMMARY_METRICS:
            assert 0.0 <= float(r[key]) <= 1.0, (key, r)
    assert "gen acc after" in (tmp_path / "toy_compare.md").read_text()
