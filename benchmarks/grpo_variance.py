"""The variance of GRPO's estimated log-ratio ``log pi_new(y|x) - log pi_old(y|x)`` on real rollouts.

``python -m benchmarks.grpo_variance --new DIR [--prompts 32] [--generations 4] [--repeats 64]``: ``pi_old`` is
the sorting demo's SFT model, ``pi_new`` a trained checkpoint (e.g. a ``--algorithm grpo`` run's ``model``
folder); the completions are ``pi_old``'s temperature-1 answers to training prompts (never test prompts).
For each completion the log-ratio is estimated ``--repeats`` times, independently, with:

* ``shared``: vrpo's estimator, n_t = 8 l-uniform ELBO samples, the same masks for both models (the default);
* ``shared, stratified``: the same with stratified levels (``--stratified``);
* ``independent``: n_t = 8, each model on its own masks (``--no_antithetic``);
* ``d1 one-step``: d1/diffu-GRPO's estimate (Zhao et al. 2025, Section 3.2): the whole response masked, each
  prompt token masked with probability 0.15, the same prompt mask for both models; it estimates a different
  quantity (a one-step log-likelihood, not the ELBO), so only its variance is comparable.

It writes ``benchmarks/results/grpo_variance.{csv,md}``: per estimator, the mean over completions of the
variance of one estimate, and the mean estimate.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch

from benchmarks.common import RESULTS, machine, write_csv
from vrpo.estimator import SamplingPlan, draw_key, elbo_terms, noisy_draw, one_step_draw
from vrpo.models import collate, encode_example, get_mask_token_id, load_mdm
from vrpo.tasks.sort.task import (
    PairSettings,
    SamplerSettings,
    pair_prompts,
    sample_answers,
    sft_path,
    task_tokenizer,
)


def completions(model, tokenizer, n_prompts: int, generations: int) -> dict[str, torch.Tensor]:
    prompts = pair_prompts(PairSettings())[:n_prompts]
    answers = sample_answers(model, tokenizer, prompts, SamplerSettings(temperature=1.0, seed=7), n=generations)
    rows = [encode_example(tokenizer, p, a) for p, group in zip(prompts, answers) for a in group]
    return collate(rows, tokenizer.eos_token_id)


@torch.no_grad()
def log_ratios(new, old, batch, mask_id, make_draw, stream: str, shared: bool, repeats: int) -> torch.Tensor:
    """float64 [B, repeats] estimates of log pi_new - log pi_old, each from ``make_draw(keys)`` (keys from
    ``stream``): the same draw for both models when ``shared``, else the old model's from the keys + 1."""
    ids, resp = batch["input_ids"], batch["response_mask"]
    kw = {"model_kwargs": {"attention_mask": batch["attention_mask"]}}
    out = []
    for k in range(repeats):
        keys = [draw_key(stream, k, b) for b in range(ids.shape[0])]
        draw = make_draw(keys)
        other = draw if shared else make_draw([key + 1 for key in keys])
        est = elbo_terms(new, ids, resp, draw, mask_id, **kw).mean(-1) - elbo_terms(
            old, ids, resp, other, mask_id, **kw
        ).mean(-1)
        out.append(est.double())
    return torch.stack(out, -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", required=True, help="the trained checkpoint directory (pi_new)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tok = task_tokenizer()
    mask_id = get_mask_token_id(tok)
    old, new = load_mdm(sft_path()).eval(), load_mdm(args.new).eval()
    batch = completions(old, tok, args.prompts, args.generations)
    ids, resp, att = batch["input_ids"], batch["response_mask"], batch["attention_mask"]

    def elbo(plan: SamplingPlan, shared: bool):
        return lambda: log_ratios(
            new,
            old,
            batch,
            mask_id,
            lambda keys: noisy_draw(ids, resp, plan, keys, mask_id),
            "grpo_variance",
            shared,
            args.repeats,
        )

    estimators = {
        "shared (n_t 8)": elbo(SamplingPlan(n_t=8), True),
        "shared, stratified (n_t 8)": elbo(SamplingPlan(n_t=8, stratified=True), True),
        "independent (n_t 8)": elbo(SamplingPlan(n_t=8), False),
        "d1 one-step": lambda: log_ratios(
            new,
            old,
            batch,
            mask_id,
            lambda keys: one_step_draw(ids, resp, att, keys, mask_id),
            "grpo_variance_d1",
            True,
            args.repeats,
        ),
    }
    rows = []
    for name, run in estimators.items():
        est = run()
        rows.append(
            {"estimator": name, "var_log_ratio": est.var(-1).mean().item(), "mean_log_ratio": est.mean().item()}
        )
        print(rows[-1], flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "grpo_variance.csv", list(rows[0]))
    command = (
        f"python -m benchmarks.grpo_variance --new {args.new} --prompts {args.prompts} "
        f"--generations {args.generations} --repeats {args.repeats}"
    )
    lines = [
        f"# Variance of the estimated log-ratio on real rollouts ({time.strftime('%Y-%m-%d')}, {machine()})",
        "",
        f"Command: `{command}`",
        "",
        f"{args.prompts * args.generations} completions (the SFT model's temperature-1 answers to "
        "training prompts); per estimator the variance of one estimate of log pi_new - log pi_old, averaged "
        "over completions, and the mean estimate (d1's estimates another quantity).",
        "",
        "| estimator | var of the log-ratio | mean log-ratio |",
        "|---|---|---|",
    ]
    lines += [f"| {r['estimator']} | {r['var_log_ratio']:.4g} | {r['mean_log_ratio']:.4f} |" for r in rows]
    base = rows[0]["var_log_ratio"]
    if base > 0:  # 0 when --new is the SFT model itself (the smoke test)
        lines += [
            "",
            "Ratio to shared masks: "
            + ", ".join(f"{r['estimator']} {r['var_log_ratio'] / base:.1f}x" for r in rows[1:]),
        ]
    (out / "grpo_variance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
