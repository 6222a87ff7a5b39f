"""Where VRPO pays: a tuned study of preference optimisation against its baselines on one bundled task.

``python -m benchmarks.budget --task sort_long`` runs it (``benchmarks/budget.py`` keeps the sorting demo's
equal-compute table for ``--task sort``). Every arm starts from the task's SFT model and trains on its
preference pairs (GRPO: on their prompts, rewarded by the verifier's partial credit):

- **equal pairs and steps** (the paper's comparison, 16 pairs a step): SFT on the chosen answers alone
  (``sft16``), naive DPO (n_t = 1, independent policy and reference masks, ``dpo16``), VRPO (n_t = 8,
  antithetic, ``n8``: the task's default run) and VRPO with the n_t its advisor gives (``adv16``);
- **equal forward passes** (128 masked forward passes per sequence side a step, as ``n8``): SFT, naive DPO and
  the advisor's allocation with the batch scaled to 128 (``sft128``, ``dpo128``, ``adv128``);
- **equal wall time**: GRPO (``--algorithm grpo``) with as many steps as take the time of ``n8``'s 200.

Two phases, so that no setting is chosen on the test prompts. ``--tune`` trains every arm with each of its
:data:`GRID` candidates (the same number for every arm) on seed 1 and grades greedy answers on the task's 256
dev prompts; each arm then keeps the candidate with the highest mean partial credit there. The test phase
(the default) trains every arm with its chosen settings on seeds 42, 2 and 3 and grades the 1024 test prompts.
Per run: exact accuracy and mean partial credit before and after, held-out preference accuracy, the score's
variance parts and the advisor's n_t, the time in optimizer steps and in all.

Results: ``benchmarks/results/budget_<task>.{csv,md,png}``. Runs already in the CSV are skipped, and the CSV is
locked while a run's row is added, so the study can be split over processes (``--arms``); ``--table`` redraws
the report from the CSV.
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
    SUMMARY_METRICS,
    StepClock,
    advised,
    locked,
    mean_sd,
    output_dir,
    plus_minus,
    read_rows,
    report_heading,
    train_demo,
    write_csv,
    write_report,
)
from vrpo.training.config import GRPOConfig, VRPOConfig

TUNE_SEED = 1  # the seed that chooses settings (on dev prompts)
SEEDS = (42, 2, 3)  # the seeds that are reported (on test prompts)
STEPS = 200  # the offline arms' steps: the task's preset
GRPO_STEPS = 64  # GRPO's steps at the wall time of n8's 200: 0.33 s against 1.0 s a step, measured on this CPU
NAN = float("nan")
QUICK = dict(max_steps=2, eval_size=16, gen_eval_prompts=16)  # --quick: the smoke test's sizes


@dataclass(frozen=True)
class Arm:
    """One recipe. ``kind`` picks its :data:`GRID` (``pref``: a preference loss, ``sft``: the SFT term alone on
    the chosen answers, ``grpo``: online RL); ``comparison`` is the table it is reported in."""

    key: str
    label: str
    comparison: str
    kind: str
    batch: int
    n_t: int = 1
    antithetic: bool = True

    def fields(self) -> dict:
        """The arm's config fields (the task's presets fill the rest)."""
        if self.kind == "grpo":
            return dict(algorithm="grpo", max_steps=GRPO_STEPS, per_device_train_batch_size=self.batch)
        return dict(
            max_steps=STEPS,
            per_device_train_batch_size=self.batch,
            n_t=self.n_t,
            antithetic=self.antithetic,
            pref_weight=0.0 if self.kind == "sft" else 1.0,
        )


PAIRS, PASSES, WALL = "equal pairs and steps", "equal forward passes", "equal wall time"
ARMS = (
    Arm("sft16", "SFT on chosen, batch 16 (n_t 8)", PAIRS, "sft", 16, 8),
    Arm("dpo16", "naive DPO, batch 16 (n_t 1, independent)", PAIRS, "pref", 16, 1, antithetic=False),
    Arm("n8", "VRPO n_t 8, batch 16 (the default)", PAIRS, "pref", 16, 8),
    Arm("adv16", "VRPO advisor's n_t 1, batch 16", PAIRS, "pref", 16, 1),
    Arm("sft128", "SFT on chosen, batch 128 (n_t 1)", PASSES, "sft", 128, 1),
    Arm("dpo128", "naive DPO, batch 128", PASSES, "pref", 128, 1, antithetic=False),
    Arm("adv128", "VRPO advisor's n_t 1, batch 128", PASSES, "pref", 128, 1),
    Arm("grpo", "GRPO, partial credit, 8 prompts x 8", WALL, "grpo", 8),
)
BY_KEY = {a.key: a for a in ARMS}
# The method against the baselines, per comparison: (VRPO arms, baseline arms).
MATCHES = {PAIRS: (("n8", "adv16"), ("sft16", "dpo16")), PASSES: (("adv128", "n8"), ("sft128", "dpo128"))}

# Every arm's candidates, six each, in two rounds. Round 1, four: preference arms at the demo's learning rate
# and a lower one, with and without the SFT term (the demo trains with one; the paper's VRPO has none); SFT and
# GRPO at four learning rates around their presets (5e-4 and 1e-4). The preference arms' best sat at the
# lowest rate, so round 2 gave every arm two more: 1e-4 with and without the SFT term, and one step past each
# end of the SFT and GRPO grids.
GRID = {
    "pref": (
        *(dict(learning_rate=lr, sft_weight=w) for lr in (2e-4, 5e-4) for w in (0.0, 1.0)),
        *(dict(learning_rate=1e-4, sft_weight=w) for w in (0.0, 1.0)),
    ),
    "sft": tuple(dict(learning_rate=lr, sft_weight=1.0) for lr in (1e-4, 2e-4, 5e-4, 1e-3, 5e-5, 2e-3)),
    "grpo": tuple(dict(learning_rate=lr, sft_weight=0.0) for lr in (3e-5, 1e-4, 3e-4, 1e-3, 1e-5, 3e-3)),
}
GRID_KEYS = ("learning_rate", "sft_weight")  # what a candidate sets
COLUMNS = (
    "phase",
    "arm",
    "seed",
    "learning_rate",
    "sft_weight",
    "steps",
    "batch",
    "n_t",
    "prompts",
    *SUMMARY_METRICS,
    "var_mask",
    "var_pairs",
    "advice_n_t",
    "train_s",
    "wall_s",
)


def run_config(task: str, arm: Arm, settings: dict, seed: int, phase: str, out: str, quick: bool):
    """The config of one run: the arm, its settings, the seed; graded on dev prompts when tuning."""
    kw = {
        **arm.fields(),
        **settings,
        "task": task,
        "seed": seed,
        "num_samples": 0,
        "report_to": "none",
        "save_steps": 0,
        "output_dir": out,
        "gen_eval_split": "dev" if phase == "tune" else "test",
        **(QUICK if quick else {}),
    }
    if arm.kind == "grpo":
        kw.pop("sft_weight")
        return GRPOConfig(**kw)
    return VRPOConfig(**kw)


def run_one(task: str, arm: Arm, settings: dict, seed: int, phase: str, root: str, quick: bool) -> dict:
    """Train one run and return its row (:data:`COLUMNS`)."""
    out = os.path.join(root, f"{phase}-{arm.key}-{seed}-{settings['learning_rate']}-{settings['sft_weight']}")
    clock = StepClock()
    run = train_demo(run_config(task, arm, settings, seed, phase, out, quick), callbacks=[clock])
    s = run.summary
    return {
        "phase": phase,
        "arm": arm.key,
        "seed": seed,
        **settings,
        "steps": s["steps"],
        "batch": arm.batch,
        "n_t": s["estimator"]["n_t"],
        "prompts": s.get("gen_prompts"),
        **{k: s.get(k) for k in SUMMARY_METRICS},
        "var_mask": s.get("score/var_mask"),
        "var_pairs": s.get("score/var_pairs"),
        "advice_n_t": s.get("advice/n_t"),
        "train_s": clock.seconds,
        "wall_s": run.wall_s,
    }


def read_csv(path: pathlib.Path) -> list[dict]:
    """The study's rows (none before its first run), counts as int and the rest as float."""
    return read_rows(path, text=("phase", "arm"), ints=("seed", "steps", "batch", "n_t", "prompts", "advice_n_t"))


def add_row(path: pathlib.Path, row: dict) -> list[dict]:
    """Append ``row`` to the CSV under its lock (other processes may be adding theirs) and return every row."""
    with locked(path):
        rows = read_csv(path)
        if not any(same_run(r, row) for r in rows):  # another process with the same --arms may have added it
            rows.append(row)
            write_csv(rows, path, COLUMNS)
    return rows


def same_settings(row: dict, settings: dict) -> bool:
    return all(math.isclose(row[k], v) for k, v in settings.items())


def same_run(row: dict, other: dict) -> bool:
    """Whether two rows are the same run: phase, arm, seed and settings."""
    keys = ("phase", "arm", "seed")
    return all(row[k] == other[k] for k in keys) and same_settings(row, {k: other[k] for k in GRID_KEYS})


def chosen(rows: list[dict], arm: Arm) -> dict | None:
    """The arm's candidate with the highest mean partial credit on the dev prompts (the first of :data:`GRID`
    on a tie); None until every candidate has been tuned."""
    tuned = [r for r in rows if r["phase"] == "tune" and r["arm"] == arm.key]
    scores = []
    for settings in GRID[arm.kind]:
        mine = [r for r in tuned if same_settings(r, settings)]
        if not mine:
            return None
        scores.append((mine[0]["gen_credit_after"], settings))
    return max(scores, key=lambda s: s[0])[1]  # max keeps the first of equals


def test_runs(rows: list[dict], arm: Arm) -> list[dict]:
    """The arm's test-phase runs with its chosen settings, one per seed (a run left from an earlier choice, or a
    second copy of a seed, never enters a mean)."""
    pick = chosen(rows, arm)
    if pick is None:
        return []
    by_seed = {}
    for r in rows:
        if r["phase"] == "test" and r["arm"] == arm.key and same_settings(r, pick):
            by_seed.setdefault(r["seed"], r)
    return list(by_seed.values())


def aggregate(rows: list[dict]) -> dict[str, dict]:
    """Per arm, over its test-phase seeds (:func:`test_runs`): the mean and sd of each metric."""
    out = {}
    for arm in ARMS:
        mine = test_runs(rows, arm)
        if not mine:
            continue
        agg = {"seeds": len(mine), "steps": int(mine[0]["steps"]), "row": mine[0]}
        for k in ("gen_acc_after", "gen_credit_after", "pref_acc_after", "var_mask", "var_pairs", "train_s"):
            agg[k], agg[k + "_sd"] = mean_sd(r[k] for r in mine)
        agg["advice"] = [n for n in map(advised, mine) if n is not None]
        out[arm.key] = agg
    return out


def spread(a: dict, b: dict) -> float:
    """The larger seed sd of two arms' mean partial credit; NaN when either has one seed (no verdict then)."""
    sds = (a["gen_credit_after_sd"], b["gen_credit_after_sd"])
    return float("nan") if any(math.isnan(x) for x in sds) else max(sds)


def goal_lines(aggs: dict, comparison: str = PAIRS) -> list[str]:
    """The goal, arm against baseline: does VRPO beat each baseline of ``comparison`` (:data:`MATCHES`) by more
    than two seed standard deviations (the larger of the two arms') in mean partial credit?"""
    lines = []
    vrpo, baselines = MATCHES[comparison]
    for v in vrpo:
        for b in baselines:
            if v not in aggs or b not in aggs:
                continue
            a, c = aggs[v], aggs[b]
            diff = a["gen_credit_after"] - c["gen_credit_after"]
            sd = spread(a, c)
            if math.isnan(sd):
                verdict = "an arm with one seed: no sd, no verdict"
            elif diff > 2 * sd:
                verdict = "**a win** (more than 2 sd)"
            elif diff < -2 * sd:
                verdict = "**a loss** (more than 2 sd)"
            else:
                verdict = "within 2 sd: no difference shown"
            lines.append(
                f"- {v} against {b}: credit {a['gen_credit_after']:.3f} against {c['gen_credit_after']:.3f}, "
                f"difference {diff:+.3f}, 2 sd = {2 * sd:.3f}: {verdict}."
            )
    return lines


def advisor_lines(aggs: dict) -> list[str]:
    """The advisor against the study: the n_t its runs advise (at 128 forward passes a step) and the VRPO arm
    that won at equal forward passes (n8 against adv128) and at equal pairs (n8 against adv16)."""
    advice = aggs["n8"]["advice"] if "n8" in aggs else []
    if not advice:
        return []
    lines = [f"- The VRPO n_t 8 runs advise n_t = {statistics.mode(advice)} ({', '.join(map(str, sorted(advice)))})."]
    for other, where in (("adv128", PASSES), ("adv16", PAIRS)):
        if "n8" not in aggs or other not in aggs:
            continue
        a, b = aggs["n8"], aggs[other]
        sd = spread(a, b)
        diff = b["gen_credit_after"] - a["gen_credit_after"]
        if math.isnan(sd):
            won = "no verdict (an arm with one seed)"
        elif abs(diff) <= 2 * sd:
            won = "neither (within 2 sd)"
        else:
            won = other if diff > 0 else "n8"
        lines.append(
            f"- {where}: n_t 1 ({other}) {b['gen_credit_after']:.3f} against n_t 8 (n8) {a['gen_credit_after']:.3f} "
            f"in partial credit; the winner: {won}."
        )
    return lines


def tune_table(rows: list[dict]) -> list[str]:
    lines = [
        "| arm | learning rate | SFT weight | dev acc | dev credit | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        pick = chosen(rows, arm)
        for r in (r for r in rows if r["phase"] == "tune" and r["arm"] == arm.key):
            mark = "**yes**" if pick is not None and same_settings(r, pick) else ""
            lines.append(
                f"| {arm.key} | {r['learning_rate']:g} | {r['sft_weight']:g} | {100 * r['gen_acc_after']:.1f} | "
                f"{r['gen_credit_after']:.3f} | {mark} |"
            )
    return lines


def test_table(aggs: dict) -> list[str]:
    lines = [
        "| comparison | arm | lr, SFT weight | seeds | steps | exact acc (%) | partial credit | pref acc (%) | "
        "var mask | var pairs | mask share | step time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        if arm.key not in aggs:
            continue
        a = aggs[arm.key]
        total = a["var_mask"] + a["var_pairs"]
        share = f"{100 * a['var_mask'] / total:.0f}%" if total > 0 else "n/a"  # NaN (no variances) compares False
        cells = (
            arm.comparison,
            arm.label,
            f"{a['row']['learning_rate']:g}, {a['row']['sft_weight']:g}",
            a["seeds"],
            a["steps"],
            plus_minus(a["gen_acc_after"], a["gen_acc_after_sd"], 100),
            plus_minus(a["gen_credit_after"], a["gen_credit_after_sd"], 1, 3),
            plus_minus(a["pref_acc_after"], a["pref_acc_after_sd"], 100),
            plus_minus(a["var_mask"], NAN, 1, 3),
            plus_minus(a["var_pairs"], NAN, 1, 3),
            share,
            plus_minus(a["train_s"], a["train_s_sd"], 1, 0),
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def task_line(task: str, digits: str, n8: list[dict], passes: dict, pairs: dict) -> str:
    """One task's row of :func:`across_tasks`: the VRPO n_t 8 runs' variance parts, the n_t they advise, and the
    arm with the best mean partial credit among ``passes`` (equal forward passes) and ``pairs`` (equal pairs)."""
    mask, _ = mean_sd(r["var_mask"] for r in n8)
    pair, _ = mean_sd(r["var_pairs"] for r in n8)
    advice = [n for n in (advised(r) for r in n8) if n is not None]

    def best(group: dict) -> str:
        key = max(group, key=lambda k: group[k])
        return f"{key} ({group[key]:.3f})"

    return (
        f"| {task} | {digits} | {mask:.3f} | {8 * mask:.2f} | {pair:.3f} | {100 * mask / (mask + pair):.0f}% | "
        f"{'/'.join(map(str, advice)) or 'n/a'} | {best(passes)} | {best(pairs)} |"
    )


def across_tasks(rows: list[dict], sort_csv: pathlib.Path) -> list[str]:
    """Both tasks side by side, when the sorting demo's study (``budget.csv``, data-rich regime) is there: does
    the mask share grow with the answer, and does the advice follow the winner?"""
    from benchmarks import budget

    sort_rows = [r for r in read_rows(sort_csv, text=("regime", "arm")) if r["regime"] == "rich"]
    aggs = aggregate(rows)
    mine = [r for r in rows if r["phase"] == "test" and r["arm"] == "n8"]
    if not sort_rows or not mine or "n8" not in aggs:
        return []

    def credit(arm: str, of: list[dict]) -> float:
        return mean_sd(r["gen_credit_after"] for r in of if r["arm"] == arm)[0]

    sort_arms = {r["arm"] for r in sort_rows}
    lines = [
        "| task | digits | var mask (n_t 8) | one mask sample | var pairs | mask share | advice n_t | "
        "best at 128 forward passes a step | best at 16 pairs a step |",
        "|---|---|---|---|---|---|---|---|---|",
        task_line(
            "sort",
            "3-6",
            [r for r in sort_rows if r["arm"] == "n8"],
            {a: credit(a, sort_rows) for a in sort_arms},  # every arm there spends 128 passes a step
            {a: credit(a, sort_rows) for a in sort_arms if budget.BY_KEY[a].batch == 16},
        ),
        task_line(
            "sort_long",
            "8-16",
            mine,
            {k: a["gen_credit_after"] for k, a in aggs.items() if BY_KEY[k].comparison == PASSES or k == "n8"},
            {k: a["gen_credit_after"] for k, a in aggs.items() if BY_KEY[k].comparison == PAIRS},
        ),
    ]
    return lines


def report(
    task: str, rows: list[dict], command: str, sort_csv: pathlib.Path | None = None, note: str | None = None
) -> str:
    aggs = aggregate(rows)
    test_rows = [r for arm in ARMS for r in test_runs(rows, arm)]

    def counts(of: list[dict], key: str) -> str:
        return "/".join(str(n) for n in sorted({r[key] for r in of})) or "n/a"

    tune_rows = [r for r in rows if r["phase"] == "tune"]
    before = sorted({(round(r["gen_acc_before"], 4), round(r["gen_credit_before"], 3)) for r in test_rows})
    notes = [f"How the runs were made: {note}"] if note else []
    lines = report_heading(f"Where VRPO pays: the tuned study on {task}", command, *notes)
    lines += [
        "Every arm starts from the task's SFT model. Settings were chosen per arm on seed "
        f"{TUNE_SEED} and {counts(tune_rows, 'prompts')} dev prompts (the table at the end); the test runs use "
        f"seeds {counts(test_rows, 'seed')} and grade greedy answers on {counts(test_rows, 'prompts')} test "
        "prompts (before training: "
        + (", ".join(f"{100 * a:.1f}% exact, credit {c:.3f}" for a, c in before) or "n/a")
        + "). Mean ± sd over seeds. Variance parts: the score's mask part and pair part over the run (the "
        "advisor's inputs); mask share = mask / (mask + pairs). Step time: seconds in optimizer steps.",
        "",
        *test_table(aggs),
    ]
    for comparison in MATCHES:
        goal = goal_lines(aggs, comparison)
        if goal:
            lines += ["", f"VRPO against each baseline at {comparison} (mean partial credit):", "", *goal]
    adv = advisor_lines(aggs)
    if adv:
        lines += ["", "The advisor against the study:", "", *adv]
    both = across_tasks(rows, sort_csv) if sort_csv is not None and sort_csv.exists() else []
    if both:
        lines += [
            "",
            "Both tasks (the sorting demo's figures from `budget.md`, data-rich regime, n_t 8 stratified; its arms "
            "there were not tuned): the VRPO n_t 8 runs' variance parts (the mask part of one pair's score at n_t 8, "
            "times 8 for one mask sample), the n_t they advise, and the best arm by mean partial credit:",
            "",
            *both,
        ]
    if any(r["phase"] == "tune" for r in rows):
        where = f"seed {TUNE_SEED}, {counts(tune_rows, 'prompts')} dev prompts"
        lines += ["", f"Tuning ({where}, every candidate run):", "", *tune_table(rows)]
    lines += ["", f"Per run: `budget_{task}.csv`."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> bool | None:
    """Mean partial credit and exact accuracy per arm (seed-sd error bars, dots: seeds). False without
    matplotlib; None before any test run."""
    try:  # optional dependency
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    aggs = aggregate(rows)
    arms = [a for a in ARMS if a.key in aggs]
    if not arms:
        return None  # tuning only: nothing to draw yet
    colors = {"sft": "tab:green", "pref": "tab:blue", "grpo": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, scale, name in (
        (axes[0], "gen_credit_after", 1, "mean partial credit"),
        (axes[1], "gen_acc_after", 100, "exact accuracy (%)"),
    ):
        xs = range(len(arms))
        means = [scale * aggs[a.key][key] for a in arms]
        sds = [0 if math.isnan(aggs[a.key][key + "_sd"]) else scale * aggs[a.key][key + "_sd"] for a in arms]
        color = ["tab:gray" if a.key.startswith("dpo") else colors[a.kind] for a in arms]
        ax.bar(xs, means, yerr=sds, color=color, capsize=3)
        for x, a in zip(xs, arms):
            seeds = [scale * r[key] for r in test_runs(rows, a)]
            ax.plot([x] * len(seeds), seeds, "k.", ms=4)
        before = [scale * r[key.replace("after", "before")] for a in arms for r in test_runs(rows, a)]
        ax.axhline(statistics.fmean(before), color="k", ls=":", lw=1, label="SFT model (before)")
        seeds_all = [scale * r[key] for a in arms for r in test_runs(rows, a)]
        lo = min(*seeds_all, statistics.fmean(before))
        ax.set_ylim(max(0.0, lo - (0.02 if scale == 1 else 1)), None)
        ax.set_xticks(list(xs), [a.key for a in arms], rotation=30)
        ax.set_ylabel(f"{name}, test prompts")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("equal pairs: sft16 dpo16 n8 adv16 | equal forward passes: + sft128 dpo128 adv128 | wall: grpo")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse(argv, task: str):
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.budget --task {task}", description=__doc__.split("\n")[0])
    p.add_argument("--task", default=task)
    p.add_argument("--tune", action="store_true", help=f"the tuning phase: every GRID candidate, seed {TUNE_SEED}")
    p.add_argument("--arms", nargs="+", default=list(BY_KEY), choices=list(BY_KEY))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="the test phase's seeds")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (2 steps, 16 prompts)")
    p.add_argument("--table", action="store_true", help="only redraw the report and plot from the CSV")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--note", default=None, help="how the runs were made (processes, load), printed above the table")
    return p.parse_args(argv)


def planned(args, rows: list[dict]) -> list[tuple[Arm, dict, int, str]]:
    """(arm, settings, seed, phase) of the runs asked for; a test run needs its arm's tuning finished."""
    arms = [BY_KEY[k] for k in args.arms]
    if args.tune:
        # candidate by candidate, so that a stopped tuning has tried every arm as often
        width = max(len(GRID[a.kind]) for a in arms)
        return [(a, GRID[a.kind][i], TUNE_SEED, "tune") for i in range(width) for a in arms if i < len(GRID[a.kind])]
    runs = []
    for arm in arms:
        pick = chosen(rows, arm)
        if pick is None:
            raise SystemExit(f"arm {arm.key}: tune it first (python -m benchmarks.budget --task {args.task} --tune)")
        runs += [(arm, pick, seed, "test") for seed in args.seeds]
    return runs


def main(argv=None, task: str = "sort_long") -> list[dict]:
    args = parse(argv, task)
    out = output_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"budget_{args.task}.csv"
    rows = read_csv(csv_path)
    if not args.table:
        with tempfile.TemporaryDirectory(prefix="vrpo-study-") as tmp:
            for arm, settings, seed, phase in planned(args, rows):
                rows = read_csv(csv_path)  # another process may have run it
                run = {"phase": phase, "arm": arm.key, "seed": seed, **settings}
                if any(same_run(r, run) for r in rows):
                    print(f"skip {phase} {arm.key} seed {seed} {settings}: already in {csv_path}", flush=True)
                    continue
                row = run_one(args.task, arm, settings, seed, phase, tmp, args.quick)
                rows = add_row(csv_path, row)
                print(row, flush=True)
    if not rows:
        raise SystemExit(f"no results in {csv_path}")
    command = f"python -m benchmarks.budget --task {args.task} --tune, then without --tune"
    if args.quick or args.seeds != list(SEEDS):
        command += f" ({'--quick, ' * args.quick}--seeds {' '.join(map(str, args.seeds))})"
    text = report(args.task, rows, command, out / "budget.csv", args.note)
    write_report(out, f"budget_{args.task}", text, lambda path: plot(rows, path))
    return rows
