"""VRPO against naive DPO at equal compute on the embedded toy task, over several seeds.

``python -m benchmarks.toy_compare [--seeds 42 2 3] [--max_steps N] [--naive_scale batch|steps]`` runs the
default run (``python -m vrpo.train`` with no model or data: the bundled SFT model on its own ranked
answers) once per seed with VRPO's defaults (n_t = 8, antithetic) and once with ``--naive_dpo``
(n_t = n_yt = 1, independent reference draws) given the same number of model forward passes: 8x the
batch (default; same steps and schedule) or 8x the steps. It writes
``benchmarks/results/toy_compare.{csv,md}`` (``toy_compare_steps.*`` with ``--naive_scale steps``):
exact-sort accuracy and mean partial credit of greedy generations on the task's test prompts
before/after, held-out preference accuracy before/after, the mean ``score/var`` over training (VRPO
only: one sample cannot estimate it), and wall time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile

from benchmarks.common import RESULTS, SUMMARY_METRICS, report_heading, train_demo, write_csv

QUICK = dict(
    max_steps=1, per_device_train_batch_size=2, eval_size=16, gen_eval_prompts=16
)  # --quick: the smoke test's sizes


def method_kwargs(naive: bool, naive_scale: str, max_steps: int | None, quick: bool = False) -> dict:
    """The config of one method; naive DPO gets VRPO's budget (n_t = 8 samples) as batch or steps."""
    from vrpo.tasks.sort import SORT_TASK
    from vrpo.training.config import VRPOConfig

    base = VRPOConfig(**(QUICK if quick else {})).resolved(SORT_TASK.presets)
    steps = max_steps or base.max_steps
    sizes = dict(
        eval_size=base.eval_size,
        per_device_train_batch_size=base.per_device_train_batch_size,
        max_steps=steps,
        gen_eval_prompts=base.gen_eval_prompts,
    )
    if not naive:
        return sizes
    budget = base.n_t * base.n_yt  # VRPO's ELBO samples per sequence, against naive DPO's one
    if naive_scale == "batch":
        return {
            **sizes,
            "algorithm": "naive_dpo",
            "per_device_train_batch_size": base.per_device_train_batch_size * budget,
        }
    return {**sizes, "algorithm": "naive_dpo", "max_steps": steps * budget, "warmup_steps": base.warmup_steps * budget}


def run_one(
    seed: int, naive: bool, naive_scale: str, max_steps: int | None, out_root: str, quick: bool = False
) -> dict:
    from vrpo.training.config import VRPOConfig

    run = train_demo(
        VRPOConfig(
            task="sort",
            seed=seed,
            num_samples=0,
            report_to="none",
            save_steps=0,
            output_dir=os.path.join(out_root, f"{'dpo' if naive else 'vrpo'}-{seed}"),
            **method_kwargs(naive, naive_scale, max_steps, quick),
        )
    )
    return {
        "method": "naive DPO" if naive else "VRPO",
        "seed": seed,
        "steps": run.summary["steps"],
        **{key: run.summary[key] for key in SUMMARY_METRICS},
        "mean_score_var": run.mean("score/var"),
        "wall_s": run.wall_s,
    }


def table(rows: list[dict], command: str) -> str:
    lines = report_heading("VRPO vs naive DPO at equal forward passes on the toy task", command) + [
        "Greedy LLaDA sampling on the task's test prompts (`vrpo.tasks.sort.test_prompts()`): exact-sort accuracy "
        "(gen acc) and mean partial credit; preference accuracy (pref acc) of the policy's ELBO margin on the "
        "held-out pairs.",
        "",
        "| method | seed | steps | gen acc before | gen acc after | credit before | credit after | "
        "pref acc before | pref acc after | mean score/var | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['steps']} | {r['gen_acc_before']:.3f} | {r['gen_acc_after']:.3f} | "
            f"{r['gen_credit_before']:.3f} | {r['gen_credit_after']:.3f} | {r['pref_acc_before']:.3f} | "
            f"{r['pref_acc_after']:.3f} | {r['mean_score_var']:.4f} | {r['wall_s']:.0f} |"
        )
    for method in ("VRPO", "naive DPO"):
        mine = [r for r in rows if r["method"] == method]
        if mine:
            mean = {k: statistics.fmean(r[k] for r in mine) for k in SUMMARY_METRICS}
            lines.append(
                f"| **{method} mean** | | | {mean['gen_acc_before']:.3f} | **{mean['gen_acc_after']:.3f}** | "
                f"{mean['gen_credit_before']:.3f} | **{mean['gen_credit_after']:.3f}** | {mean['pref_acc_before']:.3f} | "  # noqa: E501
                f"**{mean['pref_acc_after']:.3f}** | | |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[42, 2, 3],
        help="the README's seeds (seed 1 was used to choose the toy run's settings)",
    )
    parser.add_argument("--max_steps", type=int, default=None, help="VRPO's steps (default: the default run's)")
    parser.add_argument(
        "--naive_scale",
        choices=("batch", "steps"),
        default="batch",
        help="how naive DPO spends VRPO's n_t-fold forward passes",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (one step, 16 held-out pairs)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # interleave the methods, so machine noise hits both alike
            for naive in (False, True):
                rows.append(run_one(seed, naive, args.naive_scale, args.max_steps, tmp, args.quick))
                print(rows[-1], flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "toy_compare" if args.naive_scale == "batch" else f"toy_compare_{args.naive_scale}"
    write_csv(rows, out / f"{name}.csv", list(rows[0]))
    command = (
        "python -m benchmarks.toy_compare"
        + (" --quick" if args.quick else "")
        + (f" --max_steps {args.max_steps}" if args.max_steps else "")
        + f" --naive_scale {args.naive_scale} --seeds {' '.join(map(str, args.seeds))}"
    )
    text = table(rows, command)
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
