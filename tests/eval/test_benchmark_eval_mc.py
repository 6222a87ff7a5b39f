"""The benchmark's re-implementation of LLaDA's loop estimates what ``mc_scheme=llada`` estimates (so the
wall-time comparison compares two ways of computing the same numbers)."""

from __future__ import annotations

import math

import torch

from benchmarks.eval_mc import LLaDALoop
from vrpo.eval import LikelihoodEstimator, LikelihoodRequest, MCSettings, VRPOEvalLM
from vrpo.tasks.sort.task import toy_sft_path


def test_llada_loop_and_llada_scheme_agree():
    lm = VRPOEvalLM(toy_sft_path())
    ctx = lm.apply_chat_template([{"role": "user", "content": "sort 4 1 3"}])
    c, cont = lm._encode_pair(ctx, "1 4 3")  # a near miss: a sizeable, noisy ELBO
    loop = LLaDALoop(lm, mc_num=32, batch=32, seed=0)
    ours = [loop._loglikelihood(c, cont) for _ in range(24)]  # 24 estimates of 32 samples each
    est = LikelihoodEstimator(lm._terms, MCSettings(scheme="llada", mc_num=32, mc_batch=32), 4096)
    theirs = [e.mean for e in est.estimate([LikelihoodRequest(tuple(c), tuple(cont), f"r{k}") for k in range(24)])]
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 4.5 * se + 1e-4, (float(a.mean()), float(b.mean()), se)
