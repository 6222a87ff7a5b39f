"""``python -m benchmarks.budget``: every arm spends the same budget, the table and the advisor check read the
rows right, and a --quick run of one arm writes its CSV, table and plot."""

from __future__ import annotations

import csv

import pytest

from benchmarks import budget


def test_every_arm_spends_the_budget_and_the_regimes_differ_only_in_pairs():
    """Catches an arm whose batch does not match its n_t (unequal compute) and a regime that changes more than
    the pair count."""
    budget.check_arms()
    for arm in budget.ARMS:
        rich = budget.run_config(arm, "rich", 42, None, "x", quick=False)
        limited = budget.run_config(arm, "limited", 42, None, "x", quick=False)
        assert rich["max_train_pairs"] is None and limited["max_train_pairs"] == 128
        assert {k: v for k, v in rich.items() if k != "max_train_pairs"} == {
            k: v for k, v in limited.items() if k != "max_train_pairs"
        }
    assert budget.BY_KEY["dpo"].antithetic is False and budget.BY_KEY["anti1"].antithetic
    assert budget.BY_KEY["sft16"].pref_weight == 0 and budget.BY_KEY["sft128"].pref_weight == 0
    with pytest.raises(ValueError, match="arm x: batch 32 x n_t 8"):
        budget.check_arms((*budget.ARMS, budget.Arm("x", "x", batch=32, n_t=8)))


def row(regime, arm, seed, acc, mask=0.05, pairs=0.2):
    """A CSV row; ``mask`` is one sample's mask variance (the CSV holds it over n_t, as runs log it)."""
    a = budget.BY_KEY[arm]
    return {
        "regime": regime,
        "arm": arm,
        "seed": seed,
        "steps": 50,
        "batch": a.batch,
        "n_t": a.n_t,
        "n_yt": a.n_yt,
        "gen_acc_before": 0.498,
        "gen_acc_after": acc,
        "gen_credit_after": 0.9,
        "pref_acc_before": 0.75,
        "pref_acc_after": 0.9,
        "mean_score_var": 0.05 if a.n_t > 1 else float("nan"),
        "var_mask": mask / a.n_t if a.n_t > 1 else None,
        "var_pairs": pairs if a.n_t > 1 else None,
        "advice_n_t": None,
        "wall_s": 1.0,
    }


def test_the_advisor_check_names_the_best_group():
    """anti1 and n2 within 2 sd of the best (n2), n8 far below. The advice is recomputed from each run's
    variances under both criteria: with a large pair part both say n_t 1, in the best group; with a large mask
    part the loss-error criterion says 8, not in it, while the noise criterion still says 1. Catches a best
    group taken from the worst end, an advice read from the wrong arm, or the CSV's mask part not scaled back by
    n_t (the second case would then advise 1 by loss error too)."""

    def study(mask, pairs):
        rows = [row("rich", "anti1", s, acc) for s, acc in ((42, 0.80), (2, 0.82))]
        rows += [row("rich", "n2", s, acc, mask, pairs) for s, acc in ((42, 0.81), (2, 0.83))]
        rows += [row("rich", "n8", s, acc, mask, pairs) for s, acc in ((42, 0.60), (2, 0.62))]
        return rows

    rows = study(0.05, 0.2)
    aggs = budget.aggregate(rows)
    group, margin = budget.best_group(aggs, "rich")
    assert group == ["anti1", "n2"] and margin == pytest.approx(2 * 0.0141421, rel=1e-4)
    noise, error = budget.advisor_check(aggs, rows)
    for line in (noise, error):
        assert "advise n_t = 1" in line and "is in the best group" in line
    rows = study(0.5, 0.01)
    noise, error = budget.advisor_check(budget.aggregate(rows), rows)
    assert "by noise: the runs advise n_t = 1" in noise and "is in the best group" in noise
    assert "by loss error: the runs advise n_t = 8" in error and "NOT in the best group" in error
    text = budget.table(rows, "cmd", "one seed")
    assert "**Partial results**: one seed" in text and "| rich | n_t 8, stratified | 2 | 50 | 61.0 ± 1.4 |" in text
    assert "| 1/1 | 8/8 |" in text


@pytest.mark.slow
def test_quick_study_of_one_arm_writes_csv_table_and_plot(tmp_path):
    budget.main(["--quick", "--arms", "n2", "--regimes", "limited", "--seeds", "1", "--out", str(tmp_path)])
    (r,) = list(csv.DictReader((tmp_path / "budget.csv").open()))
    assert (r["regime"], r["arm"], r["batch"], r["n_t"]) == ("limited", "n2", "64", "2")
    assert 0 <= float(r["gen_acc_after"]) <= 1 and float(r["var_mask"]) >= 0 and r["advice_n_t"] in ("1", "2")
    assert "| limited | n_t 2, stratified | 1 | 2 |" in (tmp_path / "budget.md").read_text()
    assert (tmp_path / "budget.png").stat().st_size > 0
    budget.main(["--quick", "--arms", "n2", "--regimes", "limited", "--seeds", "1", "--out", str(tmp_path)])
    assert len(list(csv.DictReader((tmp_path / "budget.csv").open()))) == 1  # already there: skipped
