"""``python -m benchmarks.budget --task sort_long`` (``benchmarks/study.py``): the arms compare what they claim,
settings are chosen on the dev prompts only, the verdicts read the numbers right, and a --quick study of two arms
writes its CSV, report and plot."""

from __future__ import annotations

import csv

import pytest

from benchmarks import budget, study
from vrpo.training.config import GRPOConfig, VRPOConfig


def test_the_arms_spend_what_their_comparison_says_and_get_equal_search():
    """Catches an equal-pairs arm with another batch, an equal-passes arm with another budget, an SFT arm that
    keeps the preference loss, a naive DPO arm with antithetic masks, an arm with more candidates than the others
    (unequal search effort) and tuning runs graded on the test prompts."""
    for arm in study.ARMS:
        if arm.comparison == study.PAIRS:
            assert arm.batch == 16
        if arm.comparison == study.PASSES or arm.key == "n8":
            assert arm.batch * arm.n_t == 128
    assert {len(g) for g in study.GRID.values()} == {6}
    for key in ("sft16", "sft128"):
        assert study.BY_KEY[key].fields()["pref_weight"] == 0
    for key in ("dpo16", "dpo128"):
        assert study.BY_KEY[key].fields()["antithetic"] is False and study.BY_KEY[key].n_t == 1
    for key in ("n8", "adv16", "adv128"):
        f = study.BY_KEY[key].fields()
        assert f["antithetic"] is True and f["pref_weight"] == 1.0
    grid = study.GRID["pref"][0]
    tune = study.run_config("sort_long", study.BY_KEY["n8"], grid, 1, "tune", "x", quick=False)
    test = study.run_config("sort_long", study.BY_KEY["n8"], grid, 42, "test", "x", quick=False)
    assert isinstance(tune, VRPOConfig) and tune.gen_eval_split == "dev" and test.gen_eval_split == "test"
    assert tune.task == test.task == "sort_long"
    assert (tune.max_steps, tune.n_t, tune.learning_rate, tune.seed) == (study.STEPS, 8, grid["learning_rate"], 1)
    g = study.run_config("sort_long", study.BY_KEY["grpo"], study.GRID["grpo"][1], 2, "test", "x", quick=False)
    assert isinstance(g, GRPOConfig) and g.max_steps == study.GRPO_STEPS and g.learning_rate == 1e-4


def row(phase, arm, seed, credit, settings=None, acc=0.05, mask=None, pairs=None):
    a = study.BY_KEY[arm]
    settings = settings or study.GRID[a.kind][0]
    return {
        "phase": phase,
        "arm": arm,
        "seed": seed,
        **settings,
        "steps": 200,
        "batch": a.batch,
        "n_t": a.n_t,
        "prompts": 256 if phase == "tune" else 1024,
        "gen_acc_before": 0.02,
        "gen_acc_after": acc,
        "gen_credit_before": 0.75,
        "gen_credit_after": credit,
        "pref_acc_before": 0.65,
        "pref_acc_after": 0.7,
        "var_mask": mask,
        "var_pairs": pairs,
        "advice_n_t": None,
        "train_s": 60.0,
        "wall_s": 80.0,
    }


def tuned(*arms):
    """A finished tuning of ``arms`` whose first candidate wins (the settings :func:`row` gives by default)."""
    return [
        row("tune", arm, 1, 0.9 - 0.01 * i, s) for arm in arms for i, s in enumerate(study.GRID[study.BY_KEY[arm].kind])
    ]


def test_settings_are_chosen_on_dev_credit_once_every_candidate_ran():
    """Catches a choice made before the grid is done, the worst candidate taken, and test-phase rows (graded on
    the test prompts) leaking into the choice."""
    grid = study.GRID["sft"]
    rows = [row("tune", "sft16", 1, c, s) for c, s in zip((0.70, 0.78, 0.74, 0.72, 0.60), grid)]
    assert study.chosen(rows, study.BY_KEY["sft16"]) is None
    rows.append(row("test", "sft16", 42, 0.99, grid[5]))  # graded on the test prompts: never a tuning result
    assert study.chosen(rows, study.BY_KEY["sft16"]) is None
    rows.append(row("tune", "sft16", 1, 0.71, grid[5]))
    assert study.chosen(rows, study.BY_KEY["sft16"]) == grid[1]
    # the test runs that count: the chosen settings' only, one per seed
    rows += [row("test", "sft16", 42, 0.75, grid[1]), row("test", "sft16", 42, 0.10, grid[1])]
    assert [r["gen_credit_after"] for r in study.test_runs(rows, study.BY_KEY["sft16"])] == [0.75]
    args = study.parse(["--arms", "sft16", "dpo16"], "sort_long")
    with pytest.raises(SystemExit, match="arm dpo16: tune it first"):
        study.planned(args, rows)


def test_the_goal_and_the_advisor_verdicts_read_the_seeds():
    """n8 beats sft16 by far more than 2 sd (a win) and loses to dpo16 by more (a loss); adv16's seeds spread
    wide, so it is within 2 sd of sft16 (and still far below dpo16). The advice comes from the runs' own
    variances: a large pair part advises n_t 1. Catches a verdict with the sign flipped, a spread taken from one
    arm only, and the advice read from a column the CSV does not fill."""
    rows = tuned("sft16", "dpo16", "n8", "adv16", "adv128")
    for seed, d in ((42, 0.0), (2, 0.01), (3, -0.01)):
        rows += [
            row("test", "sft16", seed, 0.70 + d),
            row("test", "dpo16", seed, 0.90 + d),
            row("test", "n8", seed, 0.80 + d, mask=0.01 / 8, pairs=0.2),
            row("test", "adv16", seed, 0.75 + 4 * d),
            row("test", "adv128", seed, 0.85 + d),
        ]
    aggs = study.aggregate(rows)
    goal = study.goal_lines(aggs)
    assert "n8 against sft16" in goal[0] and "**a win**" in goal[0]
    assert "n8 against dpo16" in goal[1] and "**a loss**" in goal[1]
    assert "adv16 against sft16" in goal[2] and "within 2 sd" in goal[2] and "**a loss**" in goal[3]
    adv = study.advisor_lines(aggs)
    assert "advise n_t = 1 (1, 1, 1)" in adv[0]
    assert "the winner: adv128" in adv[1] and "the winner: neither" in adv[2]
    text = study.report("sort_long", rows, "cmd")
    assert "| equal pairs and steps | VRPO n_t 8, batch 16 (the default) | 0.0002, 0 | 3 | 200 |" in text


def test_both_tasks_side_by_side(tmp_path):
    """The sorting demo's row comes from its own study's data-rich runs: its n8 variances, the best of all its arms
    at 128 passes and of its batch-16 arms. Catches the limited regime mixed in and a best arm taken as the worst."""
    sort_csv = tmp_path / "budget.csv"
    sort = [
        {
            "regime": g,
            "arm": a,
            "seed": 42,
            "batch": b,
            "n_t": n,
            "n_yt": 1,
            "gen_credit_after": c,
            "var_mask": m,
            "var_pairs": v,
        }
        for g, a, b, n, c, m, v in (
            ("rich", "n8", 16, 8, 0.91, 0.07, 0.12),
            ("rich", "sft16", 16, 8, 0.94, 0.03, 0.05),
            ("rich", "sft128", 128, 1, 0.96, None, None),
            ("limited", "n8", 16, 8, 0.99, 9.0, 9.0),
        )
    ]
    budget.write_csv(sort, sort_csv, budget.COLUMNS)
    rows = tuned("n8", "sft16", "adv128", "dpo16")
    rows += [row("test", "n8", 42, 0.80, mask=0.1, pairs=0.1), row("test", "sft16", 42, 0.70)]
    rows += [row("test", "adv128", 42, 0.85), row("test", "dpo16", 42, 0.75)]
    head, _, sort_line, long_line = study.across_tasks(rows, sort_csv)
    assert "| sort | 3-6 | 0.070 | 0.56 | 0.120 | 37% |" in sort_line
    assert "sft128 (0.960) | sft16 (0.940) |" in sort_line
    assert "| sort_long | 8-16 | 0.100 | 0.80 | 0.100 | 50% |" in long_line
    assert "adv128 (0.850) | n8 (0.800) |" in long_line


@pytest.mark.slow
def test_quick_study_tunes_then_tests_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "GRID", {kind: grid[:2] for kind, grid in study.GRID.items()})  # 2 candidates each
    out = ["--quick", "--out", str(tmp_path), "--task", "sort_long", "--arms", "adv16", "grpo"]
    with pytest.raises(SystemExit, match="tune it first"):
        budget.main([*out, "--seeds", "42"])
    budget.main([*out, "--tune"])
    rows = list(csv.DictReader((tmp_path / "budget_sort_long.csv").open()))
    assert len(rows) == 4 and {r["prompts"] for r in rows} == {"16"} and {r["phase"] for r in rows} == {"tune"}
    budget.main([*out, "--seeds", "42"])
    rows = list(csv.DictReader((tmp_path / "budget_sort_long.csv").open()))
    tests = [r for r in rows if r["phase"] == "test"]
    assert sorted(r["arm"] for r in tests) == ["adv16", "grpo"] and {r["n_t"] for r in tests} == {"1", "8"}
    text = (tmp_path / "budget_sort_long.md").read_text()
    assert "| equal wall time | GRPO" in text and "Tuning (seed 1" in text
    assert (tmp_path / "budget_sort_long.png").stat().st_size > 0
    budget.main([*out, "--seeds", "42"])  # every run already in the CSV: skipped
    assert len(list(csv.DictReader((tmp_path / "budget_sort_long.csv").open()))) == 6


def test_no_verdict_from_one_seed_and_no_run_counted_twice(tmp_path):
    """A spread is NaN when either arm has one seed, whichever comes first (``max`` with a NaN depends on the
    order); a row another process already added is not added again."""
    nan = float("nan")
    for a, b in ((nan, 0.01), (0.01, nan)):
        assert study.spread({"gen_credit_after_sd": a}, {"gen_credit_after_sd": b}) != 0.01
    path = tmp_path / "budget_sort_long.csv"
    first = row("test", "n8", 42, 0.8)
    assert len(study.add_row(path, first)) == 1
    assert len(study.add_row(path, {**first, "gen_credit_after": 0.7})) == 1
