"""VRPO against naive DPO on the embedded toy task, over several seeds.

``python -m benchmarks.toy_compare [--seeds 1 2 3] [--max_steps N]`` runs the embedded default run
(``python -m vrpo.train`` with no model or data) once per seed with VRPO's defaults (n_t = 8,
antithetic) and once with ``--naive_dpo`` (n_t = n_yt = 1, independent reference draws), and writes
``benchmarks/results/toy_compare.{csv,md}``: held-out preference accuracy before/after, the final
loss, the mean ``score/var`` over training (VRPO only: one sample cannot estimate it), and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

from benchmarks.common import machine, write_csv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run_one(seed: int, naive: bool, max_steps: int | None, out_root: str) -> dict:
    from vrpo.config import VRPOConfig
    from vrpo.trainer import VRPOTrainer

    kwargs = dict(seed=seed, naive_dpo=naive, num_samples=0, report_to="none",
                  output_dir=os.path.join(out_root, f"{'dpo' if naive else 'vrpo'}-{seed}"))
    if max_steps:
        kwargs["max_steps"] = max_steps
    t0 = time.perf_counter()
    summary = VRPOTrainer(VRPOConfig(**kwargs)).train()
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in open(os.path.join(kwargs["output_dir"], "logs", "metrics.jsonl"))]
    score_var = [r["score/var"] for r in records if isinstance(r.get("score/var"), float)]
    return {
        "method": "naive DPO" if naive else "VRPO",
        "seed": seed,
        "pref_acc_before": summary["pref_acc_before"],
        "pref_acc_after": summary["pref_acc_after"],
        "final_loss": summary["final_loss"],
        "mean_score_var": statistics.fmean(score_var) if score_var else float("nan"),
        "wall_s": wall,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max_steps", type=int, default=None, help="default: the embedded run's")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # interleave the methods, so machine noise hits both alike
            for naive in (False, True):
                rows.append(run_one(seed, naive, args.max_steps, tmp))
                print(rows[-1], flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "toy_compare.csv", list(rows[0]))
    lines = [
        f"# VRPO vs naive DPO on the toy task ({time.strftime('%Y-%m-%d')}, {machine()})",
        "",
        "Command: `python -m benchmarks.toy_compare" + (f" --max_steps {args.max_steps}" if args.max_steps else "")
        + f" --seeds {' '.join(map(str, args.seeds))}`",
        "",
        "| method | seed | pref. acc. before | pref. acc. after | final loss | mean score/var | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['pref_acc_before']:.3f} | {r['pref_acc_after']:.3f} | "
                     f"{r['final_loss']:.4f} | {r['mean_score_var']:.4f} | {r['wall_s']:.0f} |")
    for method in ("VRPO", "naive DPO"):
        acc = [r["pref_acc_after"] for r in rows if r["method"] == method]
        lines.append(f"| **{method} mean** | | | **{statistics.fmean(acc):.3f}** | | | |")
    (out / "toy_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
