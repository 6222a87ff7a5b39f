"""The benchmarks run end to end at toy sizes, so that they cannot rot (no timing is asserted)."""

from __future__ import annotations

import csv
import importlib.util

from benchmarks import kernels


def test_masked_ce_benchmark_runs_at_toy_size(tmp_path):
    # torch.compile'd implementations are left out: their first compile alone takes tens of seconds.
    code = kernels.main(["--quick", "--ops", "masked_ce", "--impls", "eager,eager_gathered,vrpo_torch",
                         "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "kernels_masked_ce.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["eager", "eager_gathered", "vrpo_torch"]
    for r in rows:
        assert float(r["p20_s"]) <= float(r["median_s"]) <= float(r["p80_s"])
        assert float(r["max_err_out"]) < 1e-4 and float(r["max_err_grad"]) < 1e-4
        assert float(r["peak_extra_mb"]) >= 0
    table = (tmp_path / "kernels_masked_ce.md").read_text()
    assert "| vrpo_torch |" in table and "peak extra MB" in table
    # The plot needs matplotlib (the bench extra); without it the benchmark says so and skips it.
    png = tmp_path / "kernels_masked_ce.png"
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)
