"""The benchmark's re-implementation of LLaDA's loop estimates what ``mc_scheme=llada`` estimates (so the
wall-time comparison compares two ways of computing the same numbers)."""

from __future__ import annotations

import math

import torch

from benchmarks.eval_mc import LLaDALoop
from vrpo.eval import LikelihoodEstimator, LikelihoodRequest, MCSettings, VRPOEvalLM
from vrpo.tasks.sort.task import sft_path


def test_llada_loop_and_llada_scheme_agree():
    lm = VRPOEvalLM(sft_path())
    ctx = lm.apply_chat_template([{"role": "user", "content": "sort 4 1 3"}])
    c, cont = lm._encode_pair(ctx, "1 4 3")  # a near miss: a sizeable, noisy ELBO
    loop = LLaDALoop(lm, mc_num=32, batch=32, seed=0)
    ours = [loop._loglikelihood(c, cont) for _ in range(24)]  # 24 estimates of 32 samples each
    est = LikelihoodEstimator(lm._terms, MCSettings(scheme="llada", mc_num=32, mc_batch=32), 4096)
    theirs = [e.mean for e in est.estimate([LikelihoodRequest(tuple(c), tuple(cont), f"r{k}") for k in range(24)])]
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 4.5 * se + 1e-4, (float(a.mean()), float(b.mean()), se)


def test_the_adaptive_default_is_the_dev_curves_choice():
    """The rule takes the cheapest target within one standard error of LLaDA's agreement (not the most accurate,
    not one below the floor), and the shipped default is what the committed dev measurement chose: catches a
    default changed without a measurement, or chosen on the test documents."""
    from benchmarks.common import RESULTS, read_rows
    from benchmarks.eval_mc import DEV_TARGETS, choose_target, questions
    from vrpo.tasks.sort import SORT_TASK
    from vrpo.tasks.sort.lm_eval import MC_FILE, data_dir

    def rows(*agreements):
        return [{"agreement": a, "agreement_se": 0.02} for a in agreements]

    assert choose_target(rows(0.95, 0.96, 0.94, 0.90)) == DEV_TARGETS[1]
    assert choose_target(rows(0.95, 0.80, 0.80, 0.80)) == DEV_TARGETS[0]
    assert choose_target(rows(0.95, 0.95, 0.95, 0.95)) == DEV_TARGETS[-1]
    measured = read_rows(RESULTS / "eval_mc_dev.csv", text=("method",))
    assert MCSettings().mc_target_se == choose_target(measured)
    with open(f"{data_dir()}/{MC_FILE}") as f:
        test_docs = {line.split('"prompt": "')[1].split('"')[0] for line in f}
    assert not set(SORT_TASK.dev_prompts()) & test_docs
    lm = VRPOEvalLM(sft_path())
    contexts = [q[0].group for q in questions(lm, 3, dev=True)]  # the chat-templated prompt
    assert all(p in c for p, c in zip(SORT_TASK.dev_prompts()[:3], contexts, strict=True))
