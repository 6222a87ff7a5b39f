"""``python -m benchmarks.gpu_check --dry-run``: the GPU check's own code, on the CPU under the Triton
interpreter with tiny shapes, so that the command a GPU owner runs first cannot rot unnoticed."""

from __future__ import annotations

import pytest

from benchmarks import gpu_check


@pytest.mark.interpreter
def test_dry_run_passes_and_writes_the_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "dry run on the CPU" in text and "triton" in text
    for section in ("preflight", "correctness", "determinism", "training step", "timing"):
        assert f"| {section} |" in text, section
    assert "**FAIL**" not in text
    # Every plan item ran: each masked-CE case and dtype with and without a bias, each attention case.
    plan = gpu_check.DRY_PLAN
    assert text.count("| correctness | masked_linear_ce ") == len(plan.ce_cases) * len(plan.ce_dtypes) * 2 + 2
    assert text.count("| correctness | attention ") == (
        len(plan.attn_head_dims) * len(plan.attn_groups) * len(plan.attn_lengths))
    assert "| masked_ce | vrpo triton |" in text and "| attention | vrpo triton |" in text
    assert text.strip().splitlines()[-1].startswith("masked_ce predicted")


def test_a_failing_check_is_recorded_and_the_run_goes_on():
    report = gpu_check.Report(device=gpu_check.torch.device("cpu"))

    def broken():
        raise AssertionError("out: relative max error 1.0e-01 > 3.1e-02")

    report.check("correctness", "broken", broken)
    report.check("correctness", "fine", lambda: "all good")
    assert [r.ok for r in report.results] == [False, True]
    assert "relative max error" in report.failed[0].detail


def test_tolerance_is_in_units_of_roundoff():
    ref = gpu_check.torch.tensor([1.0, -2.0])
    bound = gpu_check._ERROR_UNITS * 2.0**-8
    gpu_check._assert_close("x", ref * (1 + bound / 4), ref, gpu_check.torch.bfloat16)
    with pytest.raises(AssertionError, match="relative max error"):
        gpu_check._assert_close("x", ref * (1 + 2 * bound), ref, gpu_check.torch.bfloat16)
