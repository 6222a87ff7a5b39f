"""``python -m benchmarks.grpo_variance`` at toy size, with the SFT model as both policies: on shared masks (and
d1's shared prompt mask) the two estimates are the same numbers, so the log-ratio is exactly 0 with no
variance; on independent masks it varies (catches a "shared" estimator that draws its masks twice)."""

from __future__ import annotations

from benchmarks import grpo_variance
from vrpo.tasks.sort.task import sft_path


def test_identical_policies_give_zero_on_shared_masks_only(tmp_path):
    rows = grpo_variance.main(
        ["--new", sft_path(), "--prompts", "2", "--generations", "2", "--repeats", "3", "--out", str(tmp_path)]
    )
    by_name = {r["estimator"]: r for r in rows}
    for name in ("shared (n_t 8)", "shared, stratified (n_t 8)", "d1 one-step"):
        assert by_name[name]["var_log_ratio"] == 0 and by_name[name]["mean_log_ratio"] == 0, name
    assert by_name["independent (n_t 8)"]["var_log_ratio"] > 0
    assert (tmp_path / "grpo_variance.md").read_text().count("|") > 8
