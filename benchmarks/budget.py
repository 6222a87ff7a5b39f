"""Where VRPO pays: masks (n_t) against pairs at equal forward passes on the sorting demo, in two data regimes.

``--task sort_long`` runs the tuned study of the long-sorting task instead (:mod:`benchmarks.study`: SFT on the
chosen answers, naive DPO, VRPO and GRPO, settings chosen per arm on dev prompts; its own flags, ``--help``
after ``--task sort_long``).

``python -m benchmarks.budget`` trains every arm from the shipped SFT model with the demo's learning rate, SFT
weight (1.0) and schedule (300 steps, 15 warm-up, cosine), each step costing the same 128 masked forward passes
per sequence side (global batch x n_t x n_yt):

- ``dpo``: naive DPO, n_t = 1 with independent policy and reference masks, batch 128;
- ``anti1``: VRPO's free part alone, n_t = 1 with antithetic masks, batch 128;
- ``n2``, ``n4``, ``n8``: n_t = 2, 4, 8 (batch 64, 32, 16), antithetic, stratified timesteps;
- ``sft128``, ``sft16``: the same SFT term alone (``--pref_weight 0``) at batch 128 (n_t 1) and 16 (n_t 8);
- ``a41``, ``a22``, ``a14``: the paper's allocations (n_t, n_yt) = (4, 1), (2, 2), (1, 4) at batch 32,
  antithetic (LLaDA 1.5, Zhu et al. 2025, Section 3.2), in the data-limited regime only;

in the data-rich regime (every training pair: 990 after the 128 held out) and the data-limited one (a seeded
128 of them, ``--max_train_pairs 128``, the same steps). Per run: exact-sort accuracy and mean partial credit of
greedy generations on the task's 1024 test prompts, held-out preference accuracy, the mean ``score/var`` and the
advisor's variances and advised n_t (arms with n_t >= 2); per arm the mean and the seed spread (sd).

Results go to ``benchmarks/results/budget.{csv,md,png}``. The CSV is appended run by run and runs already in it
are skipped, so a study can be run in pieces (``--arms``, ``--regimes``, ``--seeds``, ``--steps``); ``--table``
only redraws the table and plot from the CSV. ``--quick`` (two steps, small evaluation) is the smoke test.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import tempfile
from dataclasses import dataclass

from benchmarks.common import (
    RESULTS,
    advised,
    mean_sd,
    output_dir,
    plus_minus,
    read_rows,
    report_heading,
    train_demo,
    write_csv,
    write_report,
)
from vrpo.estimator.advisor import CRITERIA
from vrpo.training.config import VRPOConfig

BUDGET = 128  # masked forward passes per sequence side per step: the naive-DPO-at-batch-128 budget
SEEDS = (42, 2, 3)  # the README's (seed 1 chose the demo's settings)
REGIMES = {"rich": None, "limited": 128}  # --max_train_pairs
QUICK = dict(max_steps=2, eval_size=16, warmup_steps=1, gen_eval_prompts=16)  # --quick: the smoke test's sizes


@dataclass(frozen=True)
class Arm:
    """One recipe at the shared budget: ``batch * n_t * n_yt == BUDGET``."""

    key: str
    label: str
    batch: int
    n_t: int = 1
    n_yt: int = 1
    antithetic: bool = True
    stratified: bool = False
    pref_weight: float = 1.0
    regimes: tuple[str, ...] = ("rich", "limited")

    def config(self) -> dict:
        """The arm's :class:`~vrpo.training.config.VRPOConfig` fields."""
        return dict(
            per_device_train_batch_size=self.batch,
            n_t=self.n_t,
            n_yt=self.n_yt,
            antithetic=self.antithetic,
            stratified=self.stratified,
            pref_weight=self.pref_weight,
        )


ARMS = (
    Arm("dpo", "naive DPO (n_t 1, independent)", 128, antithetic=False),
    Arm("anti1", "antithetic n_t 1", 128),
    Arm("n2", "n_t 2, stratified", 64, 2, stratified=True),
    Arm("n4", "n_t 4, stratified", 32, 4, stratified=True),
    Arm("n8", "n_t 8, stratified", 16, 8, stratified=True),
    Arm("sft128", "SFT alone, batch 128", 128, pref_weight=0.0),
    Arm("sft16", "SFT alone, batch 16 (n_t 8)", 16, 8, pref_weight=0.0),
    Arm("a41", "(n_t, n_yt) = (4, 1)", 32, 4, 1, regimes=("limited",)),
    Arm("a22", "(n_t, n_yt) = (2, 2)", 32, 2, 2, regimes=("limited",)),
    Arm("a14", "(n_t, n_yt) = (1, 4)", 32, 1, 4, regimes=("limited",)),
)
BY_KEY = {a.key: a for a in ARMS}
N_FAMILY = ("anti1", "n2", "n4", "n8")  # the arms that differ only in n_t: where the advice is checked
COLUMNS = (
    "regime",
    "arm",
    "seed",
    "steps",
    "batch",
    "n_t",
    "n_yt",
    "gen_acc_before",
    "gen_acc_after",
    "gen_credit_after",
    "pref_acc_before",
    "pref_acc_after",
    "mean_score_var",
    "var_mask",
    "var_pairs",
    "advice_n_t",
    "wall_s",
)
METRICS = ("gen_acc_after", "gen_credit_after", "pref_acc_after", "mean_score_var")


def check_arms(arms=ARMS):
    """Every arm spends the budget: a mistyped batch would compare unequal compute."""
    for a in arms:
        if a.batch * a.n_t * a.n_yt != BUDGET:
            raise ValueError(f"arm {a.key}: batch {a.batch} x n_t {a.n_t} x n_yt {a.n_yt} != {BUDGET}")


def run_config(arm: Arm, regime: str, seed: int, steps: int | None, out: str, quick: bool) -> dict:
    """The run's config fields: the demo's presets (filled by the trainer) with the arm, regime and seed."""
    kw = dict(
        task="sort",
        seed=seed,
        num_samples=0,
        report_to="none",
        save_steps=0,
        output_dir=out,
        max_train_pairs=REGIMES[regime],
        **arm.config(),
        **(QUICK if quick else {}),
    )
    if steps is not None:
        kw["max_steps"] = steps
    return kw


def run_one(arm: Arm, regime: str, seed: int, steps: int | None, root: str, quick: bool = False) -> dict:
    """Train one arm and return its row (:data:`COLUMNS`)."""
    out = os.path.join(root, f"{regime}-{arm.key}-{seed}")
    run = train_demo(VRPOConfig(**run_config(arm, regime, seed, steps, out, quick)))
    summary = run.summary
    return {
        "regime": regime,
        "arm": arm.key,
        "seed": seed,
        "steps": summary["steps"],
        "batch": arm.batch,
        "n_t": arm.n_t,
        "n_yt": arm.n_yt,
        **{
            k: summary[k]
            for k in ("gen_acc_before", "gen_acc_after", "gen_credit_after", "pref_acc_before", "pref_acc_after")
        },
        "mean_score_var": run.mean("score/var"),
        "var_mask": summary.get("score/var_mask"),
        "var_pairs": summary.get("score/var_pairs"),
        "advice_n_t": summary.get("advice/n_t"),
        "wall_s": run.wall_s,
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (regime, arm): seeds, steps and each metric's mean and sd over seeds, in the order of :data:`ARMS`."""
    out = []
    for regime in REGIMES:
        for arm in ARMS:
            mine = [r for r in rows if r["regime"] == regime and r["arm"] == arm.key]
            if not mine:
                continue
            agg = {"regime": regime, "arm": arm.key, "seeds": len(mine), "steps": int(mine[0]["steps"])}
            for k in METRICS + ("var_mask", "var_pairs"):
                agg[k], agg[k + "_sd"] = mean_sd(r[k] for r in mine)
            for c in CRITERIA:
                agg["advice_" + c] = "/".join(str(n) for n in (advised(r, c) for r in mine) if n is not None)
            out.append(agg)
    return out


def best_group(aggs: list[dict], regime: str, tolerance: float = 0.02) -> tuple[list[str], float]:
    """The N_FAMILY arms of ``regime`` whose mean exact-sort accuracy is within ``max(2 sd of the best arm,
    tolerance)`` of the best one (``tolerance``: 2 points, for a single seed, which has no sd)."""
    fam = [a for a in aggs if a["regime"] == regime and a["arm"] in N_FAMILY]
    if not fam:
        return [], float("nan")
    best = max(fam, key=lambda a: a["gen_acc_after"])
    sd = best["gen_acc_after_sd"]
    margin = max(2 * sd if not math.isnan(sd) else 0.0, tolerance)
    return [a["arm"] for a in fam if a["gen_acc_after"] >= best["gen_acc_after"] - margin], margin


def advisor_check(aggs: list[dict], rows: list[dict]) -> list[str]:
    """Per regime and criterion: the n_t the runs' whole-run variances advise and whether the arm of that n_t is
    in the best group."""
    lines = []
    key_of_n = {1: "anti1", 2: "n2", 4: "n4", 8: "n8"}
    for regime in REGIMES:
        group, margin = best_group(aggs, regime)
        for criterion in CRITERIA:
            advice = [advised(r, criterion) for r in rows if r["regime"] == regime and r["arm"] in N_FAMILY]
            advice = [n for n in advice if n is not None]
            if not advice or not group:
                continue
            n = statistics.mode(advice)
            where = key_of_n.get(n)
            ran = any(a["regime"] == regime and a["arm"] == where for a in aggs)
            verdict = "not run" if not ran else "in the best group" if where in group else "NOT in the best group"
            lines.append(
                f"- {regime}, by {criterion.replace('_', ' ')}: the runs advise n_t = {n} ({len(advice)} "
                f"runs: {', '.join(map(str, sorted(advice)))}); best group of {', '.join(N_FAMILY)} (within "
                f"{100 * margin:.1f} points of the best exact-sort accuracy): {', '.join(group)}; the "
                f"advised arm is {verdict}."
            )
    return lines


def table(rows: list[dict], command: str, partial: str | None, note: str | None = None) -> str:
    aggs = aggregate(rows)
    notes = [f"**Partial results**: {partial}"] * bool(partial) + [f"How the runs were made: {note}"] * bool(note)
    lines = report_heading("Masks or pairs: the equal-compute study on the sorting demo", command, *notes)
    lines += [
        f"Every arm spends {BUDGET} masked forward passes per sequence side per step (batch x n_t x n_yt), from the "
        "shipped SFT model with the demo's learning rate, SFT weight 1.0 and schedule. Exact-sort accuracy (gen "
        "acc, %) and mean partial credit of greedy generations on the 1024 test prompts (before training: "
        f"{_before(rows)}), held-out preference accuracy (pref acc, %), mean `score/var` over training, the "
        "advisor's whole-run variances (mask part of one pair's estimate, pair part) and the n_t they advise, by "
        "score noise (the advisor's default) and by loss error (noise and ELBO bias, for comparison), one per seed. "
        "Mean ± sd over seeds (no sd with one seed).",
        "",
        "| regime | arm | seeds | steps | gen acc | credit | pref acc | score/var | var mask | var pairs | "
        "advice n_t (noise) | advice n_t (loss error) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in aggs:
        lines.append(
            f"| {a['regime']} | {BY_KEY[a['arm']].label} | {a['seeds']} | {a['steps']} | "
            f"{plus_minus(a['gen_acc_after'], a['gen_acc_after_sd'], 100)} | "
            f"{plus_minus(a['gen_credit_after'], a['gen_credit_after_sd'], 1, 3)} | "
            f"{plus_minus(a['pref_acc_after'], a['pref_acc_after_sd'], 100)} | "
            f"{plus_minus(a['mean_score_var'], a['mean_score_var_sd'], 1, 4)} | "
            f"{plus_minus(a['var_mask'], float('nan'), 1, 4)} | "
            f"{plus_minus(a['var_pairs'], float('nan'), 1, 4)} | {a['advice_noise'] or 'n/a'} | "
            f"{a['advice_loss_error'] or 'n/a'} |"
        )
    check = advisor_check(aggs, rows)
    if check:
        lines += ["", "The advisor against the study (arms that differ only in n_t):", "", *check]
    lines += ["", "Per run: `budget.csv`."]
    return "\n".join(lines) + "\n"


def _before(rows: list[dict]) -> str:
    befores = {round(r["gen_acc_before"], 4) for r in rows if r["gen_acc_before"] is not None}
    return ", ".join(f"{100 * b:.1f}%" for b in sorted(befores)) or "n/a"


def plot(rows: list[dict], path: pathlib.Path) -> bool:
    """Bar chart of exact-sort accuracy per arm (mean, seed-sd error bars; dots: seeds), one panel per regime.
    False when matplotlib is missing (``pip install 'vrpo[bench]'``)."""
    try:  # optional dependency
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    aggs = aggregate(rows)
    regimes = [g for g in REGIMES if any(a["regime"] == g for a in aggs)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        mine = [a for a in aggs if a["regime"] == regime]
        xs = range(len(mine))
        means = [100 * a["gen_acc_after"] for a in mine]
        sds = [0 if math.isnan(a["gen_acc_after_sd"]) else 100 * a["gen_acc_after_sd"] for a in mine]
        colors = [
            "tab:gray" if a["arm"] == "dpo" else "tab:green" if a["arm"].startswith("sft") else "tab:blue" for a in mine
        ]
        ax.bar(xs, means, yerr=sds, color=colors, capsize=3)
        for x, a in zip(xs, mine):
            seeds = [100 * r["gen_acc_after"] for r in rows if r["regime"] == regime and r["arm"] == a["arm"]]
            ax.plot([x] * len(seeds), seeds, "k.", ms=4)
        before = [100 * r["gen_acc_before"] for r in rows if r["regime"] == regime]
        ax.axhline(statistics.fmean(before), color="k", ls=":", lw=1, label="SFT model (before)")
        ax.set_xticks(list(xs), [a["arm"] for a in mine], rotation=30)
        ax.set_ylabel("exact-sort accuracy on test prompts (%)")
        ax.set_title(f"{regime}: {mine[0]['steps']} steps, {BUDGET} forward passes/step")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def selected(args) -> list[tuple[str, Arm, int]]:
    """(regime, arm, seed) of the runs asked for, seeds outermost so that a partial study covers every arm."""
    arms = [BY_KEY[k] for k in args.arms]
    return [(g, a, s) for s in args.seeds for g in args.regimes for a in arms if g in a.regimes]


TASK_FLAG = argparse.ArgumentParser(add_help=False)
TASK_FLAG.add_argument(
    "--task",
    default="sort",
    choices=("sort", "sort_long"),
    help="sort: this study (the default); sort_long: the tuned study of benchmarks/study.py",
)


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.budget", description=__doc__.split("\n\n")[0], parents=[TASK_FLAG]
    )
    p.add_argument("--arms", nargs="+", default=[a.key for a in ARMS], choices=list(BY_KEY), help="arms to run")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's 300)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (2 steps, 16 held-out pairs)")
    p.add_argument("--table", action="store_true", help="only redraw the table and plot from the CSV")
    p.add_argument("--partial", default=None, help="a note that the results are partial, printed above the table")
    p.add_argument(
        "--note", default=None, help="how the runs were made (e.g. split over processes), printed above the table"
    )
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive integer, got {args.steps}")
    return args


def command_line(args) -> str:
    parts = ["python -m benchmarks.budget"]
    if args.table:
        return "python -m benchmarks.budget --table (redrawn from budget.csv; the runs' commands are above)"
    if args.quick:
        parts.append("--quick")
    if args.steps:
        parts.append(f"--steps {args.steps}")
    if sorted(args.arms) != sorted(BY_KEY):
        parts.append("--arms " + " ".join(args.arms))
    if list(args.regimes) != list(REGIMES):
        parts.append("--regimes " + " ".join(args.regimes))
    parts.append("--seeds " + " ".join(map(str, args.seeds)))
    return " ".join(parts)


def main(argv=None) -> list[dict]:
    task, _ = TASK_FLAG.parse_known_args(argv)
    if task.task != "sort":  # the tuned study of another task (benchmarks/study.py)
        from benchmarks import study

        return study.main(argv, task.task)
    args = parse(argv)
    check_arms()
    out = output_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "budget.csv"
    rows = read_rows(csv_path, text=("regime", "arm"))
    if not args.table:
        done = {(r["regime"], r["arm"], int(r["seed"])) for r in rows}
        with tempfile.TemporaryDirectory(prefix="vrpo-budget-") as tmp:
            for regime, arm, seed in selected(args):
                if (regime, arm.key, seed) in done:
                    print(f"skip {regime} {arm.key} seed {seed}: already in {csv_path}", flush=True)
                    continue
                rows.append(run_one(arm, regime, seed, args.steps, tmp, args.quick))
                write_csv(rows, csv_path, COLUMNS)  # after every run: a stopped study keeps what it measured
                print(rows[-1], flush=True)
    if not rows:
        raise SystemExit(f"no results in {csv_path}")
    text = table(rows, command_line(args), args.partial, args.note)
    write_report(out, "budget", text, lambda path: plot(rows, path))
    return rows


if __name__ == "__main__":
    main()
