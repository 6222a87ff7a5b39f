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

from benchmarks.common import machine, write_csv
from vrpo.estimator import SamplingPlan, draw_key, elbo_terms, noisy_draw, one_step_draw
from vrpo.models import collate, encode_example, get_mask_token_id, load_mdm
from vrpo.tasks.sort.task import (
    PairSettings,
    SamplerSettings,
    pair_prompts,
    sample_answers,
    toy_sft_path,
    toy_tokenizer,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def completions(model, tokenizer, n_prompts: int, generations: int) -> dict[str, torch.Tensor]:
    prompts = pair_prompts(PairSettings())[:n_prompts]
    answers = sample_answers(model, tokenizer, prompts, SamplerSettings(temperature=1.0, seed=7), n=generations)
    rows = [encode_example(tokenizer, p, a) for p, group in zip(prompts, answers) for a in group]
    return collate(rows, tokenizer.eos_token_id)


@torch.no_grad()
def elbo_log_ratios(new, old, batch, mask_id, plan: SamplingPlan, shared: bool, repeats: int) -> torch.Tensor:
    """float64 [B, repeats] estimates of B_new - B_old."""
    out = []
    for k in range(repeats):
        keys = [draw_key("grpo_variance", k, b) for b in range(batch["input_ids"].shape[0])]
        draw = noisy_draw(batch["input_ids"], batch["response_mask"], plan, keys, mask_id)
        other = draw if shared else noisy_draw(batch["input_ids"], batch["response_mask"], plan, [key + 1 for key in keys],
                                               mask_id)
        kw = {"model_kwargs": {"attention_mask": batch["attention_mask"]}}
        est = (elbo_terms(new, batch["input_ids"], batch["response_mask"], draw, mask_id, **kw).mean(-1)
               - elbo_terms(old, batch["input_ids"], batch["response_mask"], other, mask_id, **kw).mean(-1))
        out.append(est.double())
    return torch.stack(out, -1)


@torch.no_grad()
def d1_log_ratios(new, old, batch, mask_id, repeats: int) -> torch.Tensor:
    """float64 [B, repeats] estimates of d1's one-step log-ratio, the same prompt mask for both models."""
    ids, resp, att = batch["input_ids"], batch["response_mask"], batch["attention_mask"]
    kw = {"model_kwargs": {"attention_mask": att}}
    out = []
    for k in range(repeats):
        keys = [draw_key("grpo_variance_d1", k, b) for b in range(ids.shape[0])]
        draw = one_step_draw(ids, resp, att, keys, mask_id)
        out.append((elbo_terms(new, ids, resp, draw, mask_id, **kw) - elbo_terms(old, ids, resp, draw, mask_id, **kw))[:, 0].double())
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
    tok = toy_tokenizer()
    mask_id = get_mask_token_id(tok)
    old, new = load_mdm(toy_sft_path()).eval(), load_mdm(args.new).eval()
    batch = completions(old, tok, args.prompts, args.generations)
    estimators = {
        "shared (n_t 8)": lambda: elbo_log_ratios(new, old, batch, mask_id, SamplingPlan(n_t=8), True, args.repeats),
        "shared, stratified (n_t 8)": lambda: elbo_log_ratios(new, old, batch, mask_id,
                                                              SamplingPlan(n_t=8, stratified=True), True, args.repeats),
        "independent (n_t 8)": lambda: elbo_log_ratios(new, old, batch, mask_id, SamplingPlan(n_t=8), False,
                                                       args.repeats),
        "d1 one-step": lambda: d1_log_ratios(new, old, batch, mask_id, args.repeats),
    }
    rows = []
    for name, run in estimators.items():
        est = run()
        rows.append({"estimator": name, "var_log_ratio": est.var(-1).mean().item(),
                     "mean_log_ratio": est.mean().item()})
        print(rows[-1], flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "grpo_variance.csv", list(rows[0]))
    command = (f"python -m benchmarks.grpo_variance --new {args.new} --prompts {args.prompts} "
               f"--generations {args.generations} --repeats {args.repeats}")
    lines = [f"# Variance of the estimated log-ratio on real rollouts ({time.strftime('%Y-%m-%d')}, {machine()})", "",
             f"Command: `{command}`", "",
             f"{args.prompts * args.generations} completions (the SFT model's temperature-1 answers to "
             "training prompts); per estimator the variance of one estimate of log pi_new - log pi_old, averaged "
             "over completions, and the mean estimate (d1's estimates another quantity).", "",
             "| estimator | var of the log-ratio | mean log-ratio |", "|---|---|---|"]
    lines += [f"| {r['estimator']} | {r['var_log_ratio']:.4g} | {r['mean_log_ratio']:.4f} |" for r in rows]
    base = rows[0]["var_log_ratio"]
    if base > 0:  # 0 when --new is the SFT model itself (the smoke test)
        lines += ["", "Ratio to shared masks: " + ", ".join(f"{r['estimator']} {r['var_log_ratio'] / base:.1f}x"
                                                         for r in rows[1:])]
    (out / "grpo_variance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
