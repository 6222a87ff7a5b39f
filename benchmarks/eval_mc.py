"""Multiple-choice likelihoods for evaluation: how many forward passes a right decision costs, and how
long a whole lm-eval run takes, for this library's estimator against LLaDA's (its ``eval_llada.py``).

1. **Agreement** (``eval_mc.md``, first table). Questions: the first ``--questions`` documents of the
   shipped task ``vrpo_sort_mc`` (the right sort among four candidates, three near misses), rendered with
   the chat template, scored by the shipped tiny SFT LLaDA. Ground truth: the decision (the choice with
   the highest ELBO) of a 4096-sample estimate per choice (common random numbers, its own seed). Each
   method decides every question ``--repeats`` times with fresh seeds; reported: agreement with the
   ground truth over all (question, repeat) pairs and over the questions whose ground-truth margin is
   clear (top-two gap above 3 standard errors), and forward passes per question (masked sequences
   scored, the unit LLaDA's ``mc_num`` counts: 4 choices x 128 for LLaDA). Methods: LLaDA's scheme at
   128 samples (``mc_scheme=llada``), ours with common random numbers at fixed budgets 8/16/32/128, ours
   without common random numbers at 32 (the ablation), ours adaptive (the default ``mc_target_se`` and
   two others).
2. **Wall time** (second table). A whole lm-eval run (``simple_evaluate``, ``--limit`` documents) of each
   shipped task: the ``vrpo`` model with its defaults against LLaDA's loop re-implemented here
   (:class:`LLaDALoop`: one request at a time, 128 samples in mini-batches of 32, full logits, no packing;
   generation one prompt at a time with LLaDA's sampler). Interleaved repeats, medians.

3. **The default's choice** (``--dev``: ``eval_mc_dev.{csv,md}``). The same agreement measurement on dev
   questions (the sorting demo's dev prompts as ``vrpo_sort_mc`` builds its documents: never a test
   document) for LLaDA's 128-sample scheme and the adaptive stop at :data:`DEV_TARGETS`; the default
   ``mc_target_se`` is the cheapest target whose agreement is within one standard error of LLaDA's
   (:func:`choose_target`).

    python -m benchmarks.eval_mc                # 24 min on a loaded 2-core CPU (6 of them the ground truth)
    python -m benchmarks.eval_mc --dev          # the default's choice on dev questions
    python -m benchmarks.eval_mc --quick        # seconds (smoke)

Writes ``eval_mc.csv`` and ``eval_mc.md`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import LM

from benchmarks.common import RESULTS, machine, median_p20_p80, output_dir, write_csv
from vrpo.eval import (
    LikelihoodEstimator,
    LikelihoodRequest,
    MCSettings,
    VRPOEvalLM,
    task_manager,
)
from vrpo.models.samplers import generate
from vrpo.tasks.sort import SORT_TASK
from vrpo.tasks.sort.lm_eval import MC_FILE, data_dir, mc_rows
from vrpo.tasks.sort.task import sft_path

GT_SAMPLES = 4096
GT_SEED = 10**6
CLEAR_MARGIN = 3.0  # ground-truth top-two gap in standard errors above which a question counts as clear


@dataclass(frozen=True)
class Method:
    name: str
    settings: MCSettings


DEV_TARGETS = (0.1, 0.25, 0.5)  # the curve the default is chosen from (a 1-nat standard error is too loose to offer)


def dev_methods() -> list[Method]:
    """LLaDA's 128-sample scheme (the reference a user compares with) and the adaptive stop at each target."""
    return [
        Method("LLaDA's scheme, 128 samples", MCSettings(scheme="llada", mc_num=128, mc_batch=32)),
        *[Method(f"ours, adaptive (mc_target_se={t})", MCSettings(mc_target_se=t)) for t in DEV_TARGETS],
    ]


def choose_target(rows: list[dict]) -> float:
    """The cheapest (largest) adaptive target whose agreement is at least LLaDA's 128-sample scheme's minus one of
    its standard errors (none: the most careful target); ``rows`` are :func:`agreement`'s for
    :func:`dev_methods`, LLaDA's first."""
    llada = rows[0]
    floor = llada["agreement"] - llada["agreement_se"]
    good = [t for t, r in zip(DEV_TARGETS, rows[1:]) if r["agreement"] >= floor]
    return max(good) if good else min(DEV_TARGETS)


def methods() -> list[Method]:
    default = MCSettings().mc_target_se
    return [
        Method("LLaDA's scheme, 128 samples", MCSettings(scheme="llada", mc_num=128, mc_batch=32)),
        *[Method(f"ours, CRN, {k} samples", MCSettings(mc_num=k)) for k in (8, 16, 32, 128)],
        Method("ours, no CRN, 32 samples", MCSettings(mc_num=32, crn=False)),
        *[
            Method(f"ours, adaptive (mc_target_se={t}{', the default' * (t == default)})", MCSettings(mc_target_se=t))
            for t in DEV_TARGETS
        ],
    ]


def questions(lm: VRPOEvalLM, n: int, dev: bool = False) -> list[list[LikelihoodRequest]]:
    """The first ``n`` documents of vrpo_sort_mc (``dev``: built the same way from the demo's dev prompts) as
    lm-eval builds them with the chat template."""
    if dev:
        rows = mc_rows(SORT_TASK.dev_prompts()[:n])
    else:
        with open(os.path.join(data_dir(), MC_FILE)) as f:
            rows = [json.loads(line) for _, line in zip(range(n), f)]
    out = []
    for row in rows:
        ctx = lm.apply_chat_template([{"role": "user", "content": row["prompt"]}])
        out.append([LikelihoodRequest(*(tuple(x) for x in lm._encode_pair(ctx, c)), group=ctx) for c in row["choices"]])
    return out


def decide(lm, qs, settings: MCSettings, max_sequences: int):
    """(decisions, means [Q][4], ses [Q][4], masked sequences scored) for all questions at once."""
    est = LikelihoodEstimator(lm._terms, settings, max_sequences=max_sequences)
    flat = est.estimate([r for q in qs for r in q])
    means = [[e.mean for e in flat[i * 4 : (i + 1) * 4]] for i in range(len(qs))]
    ses = [[e.se for e in flat[i * 4 : (i + 1) * 4]] for i in range(len(qs))]
    return [max(range(4), key=m.__getitem__) for m in means], means, ses, est.sequences


def margin(means, ses) -> float:
    """Top-two gap over its standard error (choices treated as independent: conservative under CRN)."""
    a, b = sorted(range(4), key=means.__getitem__, reverse=True)[:2]
    return (means[a] - means[b]) / max(math.hypot(ses[a], ses[b]), 1e-12)


def agreement(lm, qs, reps: int, log, which=methods) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    truth, gt_means, gt_ses, _ = decide(lm, qs, MCSettings(mc_num=GT_SAMPLES, seed=GT_SEED), GT_SAMPLES)
    clear = [margin(m, s) > CLEAR_MARGIN for m, s in zip(gt_means, gt_ses)]
    gt = {"seconds": time.perf_counter() - t0, "clear": sum(clear)}
    log(
        f"ground truth: {len(qs)} questions x 4 x {GT_SAMPLES} samples in {gt['seconds']:.0f} s; "
        f"{sum(clear)} clear (margin > {CLEAR_MARGIN} SE)"
    )
    rows = []
    for m in which():
        agree, agree_clear, seqs = [], [], 0
        for r in range(reps):
            d, _, _, s = decide(lm, qs, replace(m.settings, seed=1000 + r), 256)
            agree += [x == t for x, t in zip(d, truth)]
            agree_clear += [x == t for x, t, c in zip(d, truth, clear) if c]
            seqs += s
        n = len(agree)
        rate = sum(agree) / n
        rows.append(
            {
                "method": m.name,
                "agreement": rate,
                "agreement_se": math.sqrt(rate * (1 - rate) / n),
                "agreement_clear": sum(agree_clear) / max(len(agree_clear), 1),
                "forward_per_question": seqs / (len(qs) * reps),
                "decisions": n,
            }
        )
        log(f"{m.name}: agreement {rate:.3f}, forward passes per question {rows[-1]['forward_per_question']:.0f}")
    return rows, gt


class LLaDALoop(LM):
    """LLaDA's eval_llada.py loop, re-implemented for timing: each request on its own, ``mc_num`` samples
    in mini-batches of ``batch`` rows (LLaDA's stratified counts, a permutation per row, full logits,
    cross-entropy over the masked tokens divided by the mask ratio); generation one prompt at a time with
    LLaDA's sampler. Tokenization and answer cutting are the vrpo model's, so only the loop differs."""

    def __init__(self, inner: VRPOEvalLM, mc_num: int = 128, batch: int = 32, seed: int = 1234):
        super().__init__()
        self.inner, self.mc_num, self.batch = inner, mc_num, batch
        self.g = torch.Generator().manual_seed(seed)
        self._rank, self._world_size = 0, 1

    @property
    def tokenizer_name(self):
        return self.inner.tokenizer_name

    def chat_template(self, chat_template=False):
        return self.inner.chat_template(chat_template)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.inner.apply_chat_template(chat_history, add_generation_prompt)

    @torch.no_grad()
    def _loglikelihood(self, ctx, cont) -> float:
        seq = torch.tensor(ctx + cont).repeat(self.batch, 1)
        L, P = len(cont), len(ctx)
        total = 0.0
        for _ in range(self.mc_num // self.batch):
            k = int(torch.randint(1, L + 1, (), generator=self.g))
            x = torch.round(torch.linspace(float(k), k + (self.batch - 1) * (L / self.batch), self.batch)).long()
            x = ((x - 1) % L) + 1
            is_mask = torch.arange(L).repeat(self.batch, 1) < x[:, None]
            is_mask = torch.stack([row[torch.randperm(L, generator=self.g)] for row in is_mask])
            is_mask = torch.cat([torch.zeros(self.batch, P, dtype=torch.bool), is_mask], 1)
            noisy = torch.where(is_mask, self.inner.mask_token_id, seq)
            logits = self.inner.model(noisy).logits
            p_mask = (x / L)[:, None].expand(-1, P + L)
            loss = F.cross_entropy(logits[is_mask].float(), seq[is_mask], reduction="none") / p_mask[is_mask]
            total += float(loss.sum() / self.batch)
        return -total / (self.mc_num // self.batch)

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(self._loglikelihood(*self.inner._encode_pair(*r.args)), False) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("LLaDA's eval_llada.py has no loglikelihood_rolling")

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            ctx, kw = r.args
            ids = torch.tensor([self.inner.tok_encode(ctx)])
            n = int(kw.get("max_gen_toks", 128))
            x = generate(self.inner.model, ids, self.inner.mask_token_id, gen_length=n, steps=n)
            out.append(self.inner._answer(x[0, ids.shape[1] :].tolist(), list(kw.get("until", []))))
        return out


def wall_times(inner: VRPOEvalLM, limits: dict, reps: int, log) -> list[dict]:
    tm = task_manager()
    rows = []
    for task, limit in limits.items():
        times = {"vrpo": [], "llada_loop": []}
        scores = {}
        for r in range(reps):
            for name in times:  # interleaved
                lm = VRPOEvalLM(sft_path()) if name == "vrpo" else LLaDALoop(inner, seed=r)
                t0 = time.perf_counter()
                res = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    limit=limit,
                    apply_chat_template=True,
                    task_manager=tm,
                    log_samples=False,
                    verbosity="ERROR",
                )
                times[name].append(time.perf_counter() - t0)
                table = res["groups"].get(task) if res.get("groups") else None
                table = table or res["results"][task]
                scores[name] = table.get("acc,none", table.get("exact_match,none"))
                log(f"{task} {name} run {r}: {times[name][-1]:.1f} s, score {scores[name]:.3f}")
        for name, ts in times.items():
            med, p20, p80 = median_p20_p80(ts)
            rows.append(
                {
                    "task": task,
                    "limit": limit,
                    "model": name,
                    "median_s": med,
                    "p20_s": p20,
                    "p80_s": p80,
                    "score": scores[name],
                    "runs": len(ts),
                }
            )
    return rows


def agreement_table(rows: list[dict]) -> list[str]:
    """The agreement rows as a Markdown table, forward passes against the first row's (LLaDA's 128 samples)."""
    llada = rows[0]
    lines = [
        "| method | forward passes / question | vs LLaDA-128 | agreement (all) | agreement (clear questions) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['forward_per_question']:.0f} | "
            f"{llada['forward_per_question'] / r['forward_per_question']:.1f}x fewer | "
            f"{r['agreement']:.3f} ± {r['agreement_se']:.3f} | {r['agreement_clear']:.3f} |"
        )
    return lines


def write_md(path, args, agree_rows, gt, wall_rows, seconds):
    lines = [
        "# Multiple-choice likelihoods: agreement, forward passes and wall time (`benchmarks/eval_mc.py`)",
        "",
        f"Generated by `python -m benchmarks.eval_mc{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        "on "
        f"{datetime.date.today()} ({machine()}); {seconds:.0f} s in all.",
        "",
        f"## Agreement with a {GT_SAMPLES}-sample decision",
        "",
        f"{args.questions} questions (the first documents of `vrpo_sort_mc`, chat template, the shipped "
        f"tiny SFT LLaDA), each decided {args.repeats} times per method with fresh seeds. Ground truth: "
        f"{GT_SAMPLES} samples per choice ({gt['seconds']:.0f} s); {gt['clear']} of the {args.questions} "
        f"questions are clear (top-two gap > {CLEAR_MARGIN:g} standard errors). Forward passes: masked "
        "sequences scored per question (4 choices).",
        "",
        *agreement_table(agree_rows),
    ]
    lines += [
        "",
        "± is the binomial standard error over the (question, repeat) decisions; with few questions "
        "the decisions of one question are correlated across repeats, so differences under ~2 of them "
        "are noise.",
        "",
        "## Wall time of a whole lm-eval run",
        "",
        "`simple_evaluate` with the chat template; `vrpo`: the harness model with its defaults (adaptive "
        "likelihoods, batch 32); LLaDA's loop: one request at a time, 128 samples in mini-batches of 32. "
        f"Medians of {args.wall_repeats} interleaved runs (p20-p80).",
        "",
        "| task | documents | model | wall time (s) | score |",
        "|---|---:|---|---:|---:|",
    ]
    for r in wall_rows:
        lines.append(
            f"| {r['task']} | {r['limit']} | {r['model']} | {r['median_s']:.1f} ({r['p20_s']:.1f}-"
            f"{r['p80_s']:.1f}) | {r['score']:.3f} |"
        )
    for task in dict.fromkeys(r["task"] for r in wall_rows):
        a, b = [r for r in wall_rows if r["task"] == task]
        lines.append(f"\n{task}: the `vrpo` model is {b['median_s'] / a['median_s']:.1f}x faster than LLaDA's loop.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_dev_md(path, args, rows, gt, seconds):
    target = choose_target(rows)
    llada = rows[0]
    lines = [
        "# The adaptive stop's default, chosen on dev questions (`benchmarks/eval_mc.py --dev`)",
        "",
        f"Generated by `python -m benchmarks.eval_mc {' '.join(sys.argv[1:])}` on {datetime.date.today()} "
        f"({machine()}); {seconds:.0f} s in all.",
        "",
        f"{args.questions} dev questions (the sorting demo's first dev prompts, built as `vrpo_sort_mc` builds its "
        "documents: the right sort among four, three near misses; chat template; the shipped tiny SFT LLaDA), "
        f"each decided {args.repeats} times per method with fresh seeds. Ground truth: {GT_SAMPLES} samples per "
        f"choice ({gt['seconds']:.0f} s); {gt['clear']} of the {args.questions} questions are clear.",
        "",
        *agreement_table(rows),
    ]
    lines += [
        "",
        f"The rule (`choose_target`): the cheapest target whose agreement is at least LLaDA's minus one standard "
        f"error ({llada['agreement'] - llada['agreement_se']:.3f}). It gives **mc_target_se = {target}**.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main_dev(args, out, log):
    inner = VRPOEvalLM(sft_path())
    t0 = time.perf_counter()
    rows, gt = agreement(inner, questions(inner, args.questions, dev=True), args.repeats, log, dev_methods)
    for r, t in zip(rows, (None, *DEV_TARGETS)):
        r["target"] = t
    columns = ["method", "target", "forward_per_question", "agreement", "agreement_se", "agreement_clear"]
    write_csv(rows, os.path.join(out, "eval_mc_dev.csv"), [*columns, "decisions"])
    write_dev_md(os.path.join(out, "eval_mc_dev.md"), args, rows, gt, time.perf_counter() - t0)
    print(open(os.path.join(out, "eval_mc_dev.md")).read())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--questions", type=int, default=None, help="multiple-choice questions (default 10)")
    p.add_argument("--repeats", type=int, default=None, help="decisions per question and method (default 4)")
    p.add_argument("--mc_limit", type=int, default=None, help="documents of the MC wall-time run (default 32)")
    p.add_argument("--gen_limit", type=int, default=None, help="documents per length of the generation run (8)")
    p.add_argument("--wall_repeats", type=int, default=None, help="interleaved wall-time runs (default 2)")
    p.add_argument("--dev", action="store_true", help="choose the adaptive default on dev questions (eval_mc_dev.*)")
    args = p.parse_args(argv)
    full = dict(questions=30 if args.dev else 10, repeats=4, mc_limit=32, gen_limit=8, wall_repeats=2)
    quick = dict(questions=2, repeats=1, mc_limit=2, gen_limit=1, wall_repeats=1)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    global GT_SAMPLES
    if args.quick:
        GT_SAMPLES = 64
    elif args.dev:
        GT_SAMPLES = 2048  # 30 questions at 4096 would take 18 minutes of the 2-core CPU
    out = output_dir(args.out, args.quick)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if args.dev:
        return main_dev(args, out, log)
    inner = VRPOEvalLM(sft_path())
    agree_rows, gt = agreement(inner, questions(inner, args.questions), args.repeats, log)
    wall_rows = wall_times(
        inner, {"vrpo_sort_mc": args.mc_limit, "vrpo_sort_gen": args.gen_limit}, args.wall_repeats, log
    )
    seconds = time.perf_counter() - t0
    write_csv(
        agree_rows + wall_rows,
        os.path.join(out, "eval_mc.csv"),
        [
            "method",
            "forward_per_question",
            "agreement",
            "agreement_se",
            "agreement_clear",
            "decisions",
            "task",
            "limit",
            "model",
            "median_s",
            "p20_s",
            "p80_s",
            "score",
            "runs",
        ],
    )
    write_md(os.path.join(out, "eval_mc.md"), args, agree_rows, gt, wall_rows, seconds)
    print(open(os.path.join(out, "eval_mc.md")).read())


if __name__ == "__main__":
    main()
