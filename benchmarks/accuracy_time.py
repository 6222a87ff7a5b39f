"""Exact-sort accuracy against training time on the sorting demo: VRPO, naive DPO and GRPO, and GRPO's estimators.

``python -m benchmarks.accuracy_time [--methods vrpo dpo grpo] [--seeds 42 2 3] [--points 5]`` runs each method
from the shipped SFT model with the demo's presets (what ``python -m vrpo.train`` does with the method's flags):

- ``vrpo``: the default run (n_t = 8, antithetic, 300 steps of 16 pairs);
- ``dpo``: naive DPO at VRPO's forward passes (8x the batch; ``benchmarks.toy_compare``'s equal-compute arm);
- ``grpo``: ``--algorithm grpo`` (8 prompts x 8 completions a step, 100 steps), the library's estimator
  (n_t = 8 ELBO samples, the same masks for the current, rollout and reference policies);
- the ablation at equal rollouts, where the estimated ratio matters: two optimizer steps per rollout batch
  (``--num_iterations 2``, 50 batches in 100 steps), so the second step's ratio compares the current policy
  with the stored rollout policy: ``grpo_it2`` (the library's estimator, the same masks for both),
  ``grpo_it2_independent`` (independent masks per policy, ``--no_antithetic``) and ``grpo_it2_one_step`` (d1's
  one-step estimate, ``--likelihood one_step``: one forward with the whole response and 15% of the prompt
  masked; Zhao et al. 2025, Section 3.2). (With one step per batch the ratio is exactly 1 whatever the masks,
  and only the KL term would see them.)

Every ``max_steps / points`` steps the policy's weights are copied aside; after the run each copy answers the
task's 1024 test prompts (greedy, :func:`vrpo.tasks.sort.test_prompts`), so the curve costs the run nothing. The
time axis is the time spent in optimizer steps (rollouts, forwards, backwards and updates; not the evaluations
and checkpoints, which every method shares).

Results: ``benchmarks/results/accuracy_time.{csv,md,png}``. The CSV is appended run by run (runs already in it
are skipped), so the study can run in pieces and in parallel processes; ``--table`` only redraws the table and
plot. ``--quick`` is the smoke test.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import tempfile

from benchmarks.common import (
    RESULTS,
    StepClock,
    locked,
    output_dir,
    read_rows,
    report_heading,
    train_demo,
    write_csv,
    write_report,
)
from benchmarks.toy_compare import method_kwargs

METHODS = {  # key: (label, config overrides beyond the task's presets)
    "vrpo": ("VRPO", {}),
    "dpo": ("naive DPO (8x batch)", None),  # None: toy_compare's equal-compute arm
    "grpo": ("GRPO", {"algorithm": "grpo"}),
    "grpo_it2": ("GRPO x2 iterations, shared masks (n_t 8)", {"algorithm": "grpo", "num_iterations": 2}),
    "grpo_it2_independent": (
        "GRPO x2 iterations, independent masks (n_t 8)",
        {"algorithm": "grpo", "num_iterations": 2, "antithetic": False},
    ),
    "grpo_it2_one_step": (
        "GRPO x2 iterations, d1 one-step",
        {"algorithm": "grpo", "num_iterations": 2, "likelihood": "one_step"},
    ),
}
COLUMNS = (
    "method",
    "seed",
    "step",
    "train_s",
    "gen_acc",
    "gen_credit",
    "mean_score_var",
    "mean_clip_ratio",
    "max_steps",
)
QUICK = dict(max_steps=2, per_device_train_batch_size=2, eval_size=16, gen_eval_prompts=16)


def config_of(method: str, seed: int, out_dir: str, quick: bool):
    from vrpo.training.config import config_class

    extra = METHODS[method][1]
    if extra is None:
        extra = method_kwargs(True, "batch", None, quick)
    elif quick:
        extra = {**extra, **QUICK}
    cls = config_class(extra.get("algorithm", "vrpo"))
    return cls(task="sort", seed=seed, output_dir=out_dir, report_to="none", num_samples=0, save_steps=0, **extra)


class Snapshots(StepClock):
    """An ``on_step_end`` callback: the time spent in optimizer steps, and a copy of the policy's weights at
    ``points`` evenly spaced steps and the last one (copied outside the step's timing: the curve costs the run
    nothing)."""

    def __init__(self, points: int):
        super().__init__()
        self.points, self.taken = points, []

    def on_step_end(self, trainer, step: int, seconds: float):
        super().on_step_end(trainer, step, seconds)
        if step % max(trainer.max_steps // self.points, 1) == 0 or step == trainer.max_steps:
            weights = {k: v.detach().clone() for k, v in trainer.policy_model.state_dict().items()}
            self.taken.append((step, self.seconds, weights))


def run_one(method: str, seed: int, points: int, tmp: str, quick: bool) -> list[dict]:
    from vrpo.models import load_mdm
    from vrpo.tasks.sort import SORT_TASK

    cfg = config_of(method, seed, os.path.join(tmp, f"{method}-{seed}"), quick)
    snapshots = Snapshots(points)
    run = train_demo(cfg, callbacks=[snapshots])
    summary, records = run.summary, run.records
    common = {
        "method": method,
        "seed": seed,
        "max_steps": summary["steps"],
        "mean_score_var": mean_of(records, "score/var"),
        "mean_clip_ratio": mean_of(records, "clip_ratio"),
    }
    rows = [
        {
            **common,
            "step": 0,
            "train_s": 0.0,
            "gen_acc": summary["gen_acc_before"],
            "gen_credit": summary["gen_credit_before"],
        }
    ]
    tokenizer, prompts = SORT_TASK.tokenizer(), SORT_TASK.test_prompts()
    model = load_mdm(SORT_TASK.model_path())  # one model, each copy's weights loaded into it in turn
    for step, train_s, weights in snapshots.taken:
        model.load_state_dict(weights)
        report = SORT_TASK.evaluate(model, tokenizer, prompts[:64] if quick else prompts)
        rows.append(
            {**common, "step": step, "train_s": train_s, "gen_acc": report.accuracy, "gen_credit": report.credit}
        )
    return rows


def mean_of(records: list[dict], key: str) -> float | None:
    """The mean of a logged metric over the run's records (None when never logged or never finite)."""
    values = [r[key] for r in records if isinstance(r.get(key), float) and math.isfinite(r[key])]
    return statistics.fmean(values) if values else None


def read_results(path: pathlib.Path) -> list[dict]:
    """The study's CSV, parsed (:data:`COLUMNS`)."""
    return read_rows(path, text=("method",), ints=("seed", "step", "max_steps"))


def final_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["step"] == r["max_steps"]]


def fmt(values: list[float], spec: str) -> str:
    return format(statistics.fmean(values), spec) if values else "-"


def table(rows: list[dict], command: str) -> str:
    lines = report_heading("Exact-sort accuracy against training time", command) + [
        "Greedy answers to the task's 1024 test prompts. Training seconds: time in optimizer steps (rollouts "
        "included; evaluations and checkpoints excluded). Per method, the mean over seeds and the seed spread (sd). "
        "Mean score/var and clip_ratio: over the run's logged windows; score/var is the variance of the estimated "
        "GRPO log-ratio (VRPO: of the DPO score), 0 by construction with one step per rollout batch (the ratio is "
        "exactly 1); d1's one-step estimate is one sample, so it has none.",
        "",
        "| method | seeds | steps | acc before | acc after (mean ± sd) | credit after | training s (mean) | mean score/var | mean clip_ratio |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, (label, _) in METHODS.items():
        mine = [r for r in final_rows(rows) if r["method"] == method]
        if not mine:
            continue
        before = [r for r in rows if r["method"] == method and r["step"] == 0]
        accs = [r["gen_acc"] for r in mine]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        var = [r["mean_score_var"] for r in mine if r["mean_score_var"] is not None]
        lines.append(
            f"| {label} | {', '.join(str(r['seed']) for r in mine)} | {mine[0]['max_steps']} | "
            f"{statistics.fmean(r['gen_acc'] for r in before):.3f} | {statistics.fmean(accs):.3f} ± {sd:.3f} | "
            f"{statistics.fmean(r['gen_credit'] for r in mine):.3f} | {statistics.fmean(r['train_s'] for r in mine):.0f} | "  # noqa: E501
            f"{fmt(var, '.4f')} | {fmt([r['mean_clip_ratio'] for r in mine if r['mean_clip_ratio'] is not None], '.4f')} |"  # noqa: E501
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, (label, _)) in enumerate(METHODS.items()):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        colour = f"C{i}"
        seeds = sorted({r["seed"] for r in mine})
        for seed in seeds:
            run = sorted((r for r in mine if r["seed"] == seed), key=lambda r: r["step"])
            ax.plot([r["train_s"] for r in run], [r["gen_acc"] for r in run], color=colour, alpha=0.3, lw=1)
        steps = sorted({r["step"] for r in mine})
        mean_t = [statistics.fmean(r["train_s"] for r in mine if r["step"] == s) for s in steps]
        mean_a = [statistics.fmean(r["gen_acc"] for r in mine if r["step"] == s) for s in steps]
        ax.plot(mean_t, mean_a, color=colour, lw=2, marker="o", ms=3, label=f"{label} ({len(seeds)} seeds)")
    ax.set_xlabel("training time, s (2-core CPU, 1 thread per run)")
    ax.set_ylabel("exact-sort accuracy, 1024 test prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["vrpo", "dpo", "grpo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 2, 3])
    parser.add_argument("--points", type=int, default=5, help="weight copies graded per run (besides step 0)")
    parser.add_argument("--table", action="store_true", help="only redraw the table and plot from the CSV")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (two steps, 64 test prompts)")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    out = output_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "accuracy_time.csv"
    if not args.table:
        with tempfile.TemporaryDirectory(prefix="vrpo-accuracy-time-") as tmp:
            for seed in args.seeds:  # seeds outermost: machine noise hits every method alike
                for method in args.methods:
                    with locked(csv_path):
                        done = {(r["method"], r["seed"]) for r in read_results(csv_path)}
                    if (method, seed) in done:
                        print(f"skip {method} seed {seed}: already in {csv_path}", flush=True)
                        continue
                    new = run_one(method, seed, args.points, tmp, args.quick)
                    with locked(csv_path):  # re-read: another piece may have appended meanwhile
                        rows = read_results(csv_path)
                        if any((r["method"], r["seed"]) == (method, seed) for r in rows):
                            print(f"{method} seed {seed}: another piece wrote it first; this run is not kept")
                        else:
                            write_csv(rows + new, csv_path, COLUMNS)
                    print(new[-1], flush=True)
    with locked(csv_path):
        rows = read_results(csv_path)
    if not rows:
        raise SystemExit(f"no results in {csv_path}")
    text = table(
        rows,
        "python -m benchmarks.accuracy_time --methods "
        + " ".join(m for m in METHODS if any(r["method"] == m for r in rows)),
    )
    write_report(out, "accuracy_time", text, lambda path: plot(rows, path))
    return rows


if __name__ == "__main__":
    main()
