"""Smoke tests of benchmarks/variance.py and benchmarks/train_step.py at toy size (CPU, no timing).

They run each benchmark end to end into a temporary directory and check the files it writes, so
that the benchmarks cannot rot; and they check the statistics the variance table rests on.
"""

from __future__ import annotations

import csv
import importlib.util
import math

import pytest
import torch

from benchmarks import train_step as step_bench
from benchmarks import variance as var_bench
from vrpo.training.loading import elbo_module


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_summarise_matches_the_definitions():
    g = torch.Generator().manual_seed(0)
    R, P = 6, 5
    scores = torch.randn(R, P, generator=g, dtype=torch.float64) * torch.arange(1, P + 1)
    losses = scores.abs()
    grad = torch.randn(R, 7, generator=g, dtype=torch.float64)
    out = var_bench.summarise(scores, losses, {"var_grad": grad})
    per_pair = [statistics_var(scores[:, p].tolist()) for p in range(P)]
    assert out["var_score"] == pytest.approx(sum(per_pair) / P)
    assert out["var_loss"] == pytest.approx(losses.var(0).mean().item())
    assert out["var_grad"] == pytest.approx(sum(statistics_var(grad[:, j].tolist()) for j in range(7)) / P)
    assert out["mean_score"] == pytest.approx(scores.mean().item())
    assert all(out[k] > 0 for k in ("var_score_se", "var_loss_se", "var_grad_se"))
    # Identical repeats: no variance and no spread of it.
    same = lambda x: x[:1].repeat(4, 1)  # noqa: E731
    flat = var_bench.summarise(same(scores), same(losses), {"var_grad": same(grad)})
    assert flat["var_score"] == flat["var_grad"] == 0.0
    assert flat["var_score_se"] < 1e-12 and flat["var_grad_se"] < 1e-12


def test_resampled_variances_are_those_of_the_resampled_repeats():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    got = var_bench._resampled_variances(x, n_boot=7, seed=4)
    idx = torch.randint(5, (7, 5), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, torch.stack([x[i].var(0) for i in idx]))


def statistics_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer, info = var_bench.train_policy(
        0, 2, None, seed=3, workdir=str(tmp_path_factory.mktemp("train")), eval_size=8, quick=True
    )
    return trainer


def test_replicates_are_seeded_and_antithetic_draws_cancel(trained):
    settings = (var_bench.Setting(2, 1, True), var_bench.Setting(2, 1, False))
    a = var_bench.measure(trained, settings, pairs=3, repeats=2, seed=1, chunk=2, progress=False)
    b = var_bench.measure(trained, settings, pairs=3, repeats=2, seed=1, chunk=2, progress=False)
    keys = ("var_score", "var_loss", "var_grad", "var_grad_head", "mean_score")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    c = var_bench.measure(trained, settings[:1], pairs=3, repeats=2, seed=2, chunk=3, progress=False)
    assert c[0]["var_score"] != a[0]["var_score"]
    # With the policy as its own reference, antithetic scores are exactly 0; independent draws are not.
    ref = trained.reference.elbo
    trained.reference.elbo = elbo_module(trained.policy_model, trained.config, trained.mask_token_id)
    try:
        same = var_bench.measure(trained, settings, pairs=3, repeats=3, seed=1, chunk=3, progress=False)
    finally:
        trained.reference.elbo = ref
    assert same[0]["var_score"] == 0.0 and same[0]["mean_score"] == 0.0
    assert same[1]["var_score"] > 0.0


def test_variance_benchmark_quick_writes_its_outputs(tmp_path):
    rows = var_bench.run(str(tmp_path), quick=True, progress=False)
    labels = [s.label for s in var_bench.SETTINGS]
    sweep = [(a, s.label) for a in var_bench.QUICK["alphas"] for s in var_bench.ANTITHETIC_SETTINGS]
    assert [(r["alpha"], r["config"]) for r in rows] == [(1.0, c) for c in labels] + sweep
    columns, table = read_csv(tmp_path / "variance.csv")
    assert tuple(columns) == var_bench.CSV_COLUMNS
    assert [(float(r["alpha"]), r["config"]) for r in table] == [(1.0, c) for c in labels] + sweep
    for r in table:
        for key in ("var_score", "var_loss", "var_grad", "var_grad_head"):
            assert math.isfinite(float(r[key])) and float(r[key]) >= 0, (r["config"], key, r[key])
        assert int(r["repeats"]) == var_bench.QUICK["repeats"] and int(r["pairs"]) == var_bench.QUICK["pairs"]
        assert int(r["n"]) == int(r["n_t"]) * int(r["n_yt"])
        has_paper = r["config"] in var_bench.PAPER and float(r["alpha"]) == 1.0
        assert (r["paper_var_score"] != "") == has_paper
    md = (tmp_path / "variance.md").read_text(encoding="utf-8")
    assert "| (n_t, n_yt, antithetic) | " + " | ".join(labels) + " |" in md
    assert "| Var of score, paper | 2.2 | 44 | 1 | 7.3 | 4.7 | 2184 | — | — |" in md
    assert md.count("Var of score") >= 4 and "python -m benchmarks.variance" in md
    sweep_lines = [line for line in md.splitlines() if line.startswith("| 0.5 |") or line.startswith("| 1 |")]
    assert len(sweep_lines) == 2, md
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "variance.png").exists() == has_mpl
    if has_mpl:
        assert (tmp_path / "variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interpolated_policy_restores_the_weights(trained):
    policy = trained.policy_model
    ref = trained.reference.elbo.model
    before = [p.detach().clone() for p in policy.parameters()]
    with var_bench.interpolated_policy(trained, 0.25):
        for p, q, b in zip(policy.parameters(), ref.parameters(), before):
            torch.testing.assert_close(p.detach(), q + 0.25 * (b - q))
    for p, b in zip(policy.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_variance_benchmark_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="--repeats"):
        var_bench.run(str(tmp_path), quick=True, repeats=1)
    with pytest.raises(ValueError, match="--alphas"):
        var_bench.run(str(tmp_path), quick=True, alphas=(1.5,))
    with pytest.raises(ValueError, match="--learning_rate"):
        var_bench.run(str(tmp_path), quick=True, learning_rate=0.0)


def test_train_step_benchmark_quick_writes_its_outputs(tmp_path):
    rows = step_bench.run(str(tmp_path), quick=True)
    assert [(r["model"], r["impl"]) for r in rows] == [("tiny", "fused"), ("tiny", "eager")]
    columns, table = read_csv(tmp_path / "train_step.csv")
    assert tuple(columns) == step_bench.CSV_COLUMNS
    assert len(table) == 2
    fused, eager = table
    # The same pairs and draws through both paths: the same token count.
    assert int(fused["tokens_per_step"]) == int(eager["tokens_per_step"]) > 0
    for r in table:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["tokens_per_s"]) > 0 and int(r["n"]) == 8
        assert int(r["peak_mem_bytes"]) > 0, r
    assert float(eager["speedup_vs_eager"]) == float(eager["paired_speedup"]) == float(eager["mem_vs_eager"]) == 1.0
    assert float(fused["paired_speedup"]) > 0
    assert "masked_linear_ce(impl='torch')" in fused["head"]
    md = (tmp_path / "train_step.md").read_text(encoding="utf-8")
    assert md.count("\n| tiny | 136 |") == 2 and "python -m benchmarks.train_step" in md


def test_train_step_benchmark_rejects_unknown_models(tmp_path):
    with pytest.raises(ValueError, match="--models"):
        step_bench.run(str(tmp_path), models=("nope",))
