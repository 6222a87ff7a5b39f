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
    # + the -inf bias and forward-only cases, the multi-chunk ones, 64-bit offsets, autocast, cuda:1, GEMM forms.
    assert text.count("| correctness | masked_linear_ce ") == (
        len(plan.ce_cases) * len(plan.ce_dtypes) * 2 + 2 + len(plan.ce_multi_chunk) + 4)
    assert "3 chunks: out" in text and "softmax part" in text and "passed: upcast, scratch16_add, upcast_add" in text
    assert text.count("| correctness | attention ") == (
        len(plan.attn_head_dims) * len(plan.attn_groups) * len(plan.attn_lengths))
    assert "| masked_ce | vrpo triton |" in text and "| attention | vrpo triton |" in text
    assert text.strip().splitlines()[-1].startswith("masked_ce predicted")
    assert text.strip().splitlines()[-2].startswith("masked_ce expected")
    assert "torch " in text and "triton " in text  # the versions the results were measured with


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


# Each planted bug and the checks it must fail (at least one of them, and no check outside the op).
PLANTED = {
    "onehot_only": "masked_linear_ce",
    "skip_last_chunk": "masked_linear_ce multi-chunk backward",
    "stale_lse": "masked_linear_ce",
    "no_segment_mask": "attention",
    "mask_count_off_by_one": "sample_masks",
}


@pytest.mark.interpreter
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_each_planted_bug_fails_the_dry_run_and_is_named(bug, tmp_path, capsys):
    assert set(PLANTED) == set(gpu_check.PLANTS)
    assert gpu_check.main(["--dry-run", "--plant", bug, "--out", str(tmp_path)]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED: ")]
    assert failed and all(line.startswith(f"FAILED: correctness: {PLANTED[bug].split()[0]}") for line in failed), failed
    assert any(PLANTED[bug] in line for line in failed), failed
    assert f"planted bug '{bug}'" in (tmp_path / "gpu_check.md").read_text()


def test_plant_needs_the_dry_run(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--plant", "onehot_only"])
    assert "--plant" in capsys.readouterr().err


def test_realistic_logits_and_the_softmax_part_check():
    """With random (uniform-softmax) inputs at a large vocabulary the softmax part is ~1/V of each
    gradient, so a backward returning only the one-hot part passed the max-relative checks; the inputs
    now put about half the probability on one token (entropy a few nats), and the softmax part is
    checked on its own: dropping it is an error of 1 against a bound of ~1e-4 in fp32."""
    torch = gpu_check.torch
    x = gpu_check.ce_inputs(6, 6, 16, 2000, torch.float32, torch.device("cpu"))
    ref = gpu_check.ce_reference(x)
    for i in range(2):  # d_hidden, d_weight
        onehot_only = ref.grads[i] - ref.soft[i]
        err = float((onehot_only - ref.grads[i]).norm() / ref.soft[i].norm())
        assert err > 100 * gpu_check.softmax_part_bound(torch.float32, 2000, 16, ref, i, interpreter=False)
    probs = torch.softmax(x["hidden"].double() @ x["weight"].double().T, -1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    assert float(probs.max(-1).values.mean()) > 0.3 and 1 < float(entropy.mean()) < 6


def test_results_are_written_atomically(tmp_path, monkeypatch):
    """The results file is replaced whole: a write that fails midway leaves the old one and no temporary."""
    path = tmp_path / "gpu_check.md"
    path.write_text("old")
    gpu_check.write_atomically(str(path), "new")
    assert path.read_text() == "new"

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gpu_check.os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        gpu_check.write_atomically(str(path), "newer")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["gpu_check.md"]
