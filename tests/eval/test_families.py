"""The harness model on the other family of the table: Dream (shifted logits, its own sampler), with the
tiny Dream fixture and the demo's character tokenizer (ids below its 300-token vocabulary)."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from vrpo.estimator import HeadOptions
from vrpo.estimator.elbo import elbo_terms
from vrpo.estimator.sampling import MaskDraw, SamplingPlan
from vrpo.eval import VRPOEvalLM
from vrpo.models import DREAM
from vrpo.tasks.sort.task import task_tokenizer

from ..helpers import FIXTURES


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    task_tokenizer().save_pretrained(tok)
    return VRPOEvalLM(str(FIXTURES / "dream-tiny"), tokenizer=str(tok), mc_num=4)


def test_dream_likelihood_terms_match_the_unpacked_elbo(dream):
    assert dream.family is DREAM
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 13, 0, 0]])
    resp = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    masked = (torch.rand(2, 3, 7, generator=g) < 0.5) & resp[:, None]
    masked[:, :, 3] |= resp[:, None, 3]  # at least one masked token per sample
    weight = torch.rand(2, 3, generator=g) + 1
    packed = dream._terms(ids, resp, masked, weight)
    for b, n in ((0, 7), (1, 5)):  # unpacked, without padding, generic logits path
        m = masked[b : b + 1, :, :n]
        draw = MaskDraw(m, weight[b : b + 1], m.sum(-1).float(), SamplingPlan(n_t=3))
        ref = elbo_terms(
            dream.model,
            ids[b : b + 1, :n],
            resp[b : b + 1, :n],
            draw,
            dream.mask_token_id,
            head=HeadOptions(fused=False),
        )
        # float32 model, sums of <= 4 log-probabilities of a 300-way softmax: 1e-5 is ~100 ulps of the terms.
        torch.testing.assert_close(packed[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_dream_runs_through_likelihood_and_generation(dream):
    reqs = [Instance("loglikelihood", {}, ("sort 2 1", c), i, ("t", 0, 1)) for i, c in enumerate([" 1 2", " 2 1"])]
    out = dream.loglikelihood(reqs)
    assert all(isinstance(ll, float) and ll < 0 for ll, _ in out)
    assert dream.sample_stats[("t", 0, 0)]["mc_samples"] == 4
    (text,) = dream.generate_until([Instance("generate_until", {}, ("sort 2 1", {"until": [], "max_gen_toks": 4}), 0)])
    assert isinstance(text, str)  # random weights: any text, cut at special tokens
