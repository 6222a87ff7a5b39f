"""The score's mask noise against the answer's length, within one task: does it grow with the answer, as the
paper's Table 2 implies (LLaDA 1.5, Section 3.2)?

``python -m benchmarks.mask_noise --task sort_long --policy OUT/model`` loads a trained policy (a run's
``model/``) against the task's SFT model as the reference, takes the run's 128 held-out pairs (seed 42's split,
as the default run holds them out) and, for ``--repeats`` fresh antithetic draws with n_t = 1, computes each
pair's VRPO score ``beta * [(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))]`` (the draws, reference terms
and margins are the trainer's own, :func:`benchmarks.variance.replicate`). Per bucket of chosen-answer length
(response tokens): the mask part (the variance of a pair's score over the draws, averaged over pairs) and the
pair part (the variance over pairs of their mean score, less the mask noise left in those means), the two
figures the budget advisor weighs. Results: ``benchmarks/results/mask_noise_<task>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict

import torch

from benchmarks.common import RESULTS, output_dir, report_heading, write_csv
from benchmarks.variance import Setting, replicate
from vrpo.estimator.advisor import variance_parts

ONE_MASK = Setting(1, 1, True)  # one antithetic mask per sequence: the noise the advisor's n_t divides
COLUMNS = ("tokens", "pairs", "mask_var", "mask_var_se", "pair_var", "ratio")


def buckets(lengths: list[int], edges: tuple[int, ...]) -> dict[str, list[int]]:
    """Pair indices by chosen-answer length: one bucket per length when ``edges`` is empty, else the ranges
    ``(previous edge, edge]`` (``"a-b"``) over the lengths present."""
    out = defaultdict(list)
    for i, n in enumerate(lengths):
        if not edges:
            out[str(n)].append(i)
            continue
        lo = min(lengths) - 1
        for edge in (*edges, max(lengths)):
            if n <= edge:
                out[f"{lo + 1}-{edge}"].append(i)
                break
            lo = edge
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("-")[0])))


def parts(scores: torch.Tensor, members: list[int]) -> tuple[float, float, float]:
    """(mask part, its standard error over the pairs, pair part) of the scores ``[R, P]`` of the pairs
    ``members``: the advisor's own estimates (:func:`vrpo.estimator.advisor.variance_parts`; the pair part
    unclamped). One pair has no pair part."""
    s = scores[:, members]
    per_pair = s.var(0)
    if len(members) < 2:
        return per_pair.mean().item(), float("nan"), float("nan")
    vp = variance_parts(s.T)
    return vp.mask, (per_pair.std() / len(members) ** 0.5).item(), vp.pairs_raw


def ratio(mask: float, pair: float) -> float:
    """mask / pair; NaN when the pair part is not positive (a policy at the reference: every score 0)."""
    return mask / pair if pair > 0 else float("nan")


def measure(task: str, policy: str, repeats: int, seed: int, edges: tuple[int, ...], quick: bool) -> list[dict]:
    """One row per length bucket (and ``"all"``)."""
    from vrpo.tasks import get_task
    from vrpo.training import VRPOTrainer
    from vrpo.training.config import VRPOConfig

    graded = get_task(task)
    presets = graded.presets
    with tempfile.TemporaryDirectory(prefix="vrpo-mask-noise-") as out:
        cfg = VRPOConfig(
            task=task,
            model_name_or_path=policy,
            ref_model_name_or_path=graded.model_path(),
            tokenizer_name_or_path=graded.model_path(),
            output_dir=out,
            report_to="none",
            num_samples=0,
            save_steps=0,
            max_steps=1,
            eval_size=16 if quick else 128,
            seed=seed,
            max_length=presets["max_length"],
        )
        trainer = VRPOTrainer(cfg, task=graded)
        try:
            ids = list(range(len(trainer.eval_pairs)))
            runs = [replicate(trainer, ONE_MASK, ids, r, seed, 32, cfg.beta, grads=False) for r in range(repeats)]
            scores = torch.stack([run[0] for run in runs])
            lengths = [int(trainer.eval_pairs.sequence(i, 0)["response_mask"].sum()) for i in ids]
        finally:
            trainer.close()
    rows = []
    for name, members in [*buckets(lengths, edges).items(), ("all", ids)]:
        mask, se, pair = parts(scores, members)
        rows.append(
            dict(tokens=name, pairs=len(members), mask_var=mask, mask_var_se=se, pair_var=pair, ratio=ratio(mask, pair))
        )
    return rows


def report(rows: list[dict], command: str, task: str, note: str | None = None) -> str:
    lines = report_heading(f"The score's mask noise by answer length ({task})", command, *([note] if note else []))
    lines += [
        "One antithetic mask per sequence (n_t = 1): the mask part is a pair's score variance over the draws "
        "(mean over pairs), the pair part the variance of the pairs' mean scores less the mask noise in them.",
        "",
        "| chosen answer (tokens) | pairs | mask part (± se over pairs) | pair part | mask / pair |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['pairs']} | {r['mask_var']:.3f} ± {r['mask_var_se']:.3f} | {r['pair_var']:.3f} | "
            f"{r['ratio']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mask_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sort_long", choices=("sort", "sort_long"))
    p.add_argument("--policy", required=True, help="a trained run's model/ folder (the reference: the task's SFT)")
    p.add_argument("--repeats", type=int, default=16, help="draws per pair (>= 2)")
    p.add_argument("--seed", type=int, default=42, help="the run's seed: its held-out split; also the draws' key")
    p.add_argument("--edges", type=int, nargs="*", default=None, help="bucket edges in tokens (default: the task's)")
    p.add_argument("--quick", action="store_true", help="16 pairs (smoke test)")
    p.add_argument("--note", default=None, help="how the policy was made, printed above the table")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error(f"--repeats must be at least 2 (a variance needs two draws), got {args.repeats}")
    if not os.path.isdir(args.policy):
        p.error(f"--policy {args.policy}: not a directory")
    edges = tuple(args.edges) if args.edges is not None else ((21, 27) if args.task == "sort_long" else ())
    rows = measure(args.task, args.policy, args.repeats, args.seed, edges, args.quick)
    out = output_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"mask_noise_{args.task}.csv", COLUMNS)
    command = f"python -m benchmarks.mask_noise --task {args.task} --policy POLICY --repeats {args.repeats}"
    text = report(rows, command, args.task, args.note)
    (out / f"mask_noise_{args.task}.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
