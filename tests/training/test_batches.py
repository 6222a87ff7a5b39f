"""A sequence's noisy inputs depend on its key and its own response alone: the same whatever micro-batch,
batch slot, padding or process it lands in (what makes resumed, multi-process and precomputed-reference
runs draw what a single uninterrupted run draws)."""

from __future__ import annotations

import torch

from vrpo.estimator import SamplingPlan
from vrpo.models import build_tiny_tokenizer
from vrpo.tasks.sort.task import make_pairs
from vrpo.training.batches import Batches
from vrpo.training.data import tokenize_pairs


def _response(batch, draw, row):
    """The draw's noisy ids and masks of ``row``, on its response positions only."""
    resp = batch["response_mask"][row]
    return draw.input_ids[row][:, resp], draw.masked[row][:, resp], draw.weight[row]


def test_a_pair_draws_the_same_noisy_inputs_in_any_batch():
    tok = build_tiny_tokenizer(vocab_size=136)
    pairs = tokenize_pairs(make_pairs(12, seed=3), tok, max_length=64, progress=False)
    batches = Batches(tok.pad_token_id, torch.device("cpu"), seed=7, mask_token_id=tok.mask_token_id)
    plan = SamplingPlan(n_t=4, stratified=True)
    alone = [(0, 5)]
    crowd = [(0, 1), (0, 9), (0, 5), (0, 2)]  # another slot, other neighbours, other padding
    b1, b2 = batches.of(pairs, alone), batches.of(pairs, crowd)
    d1, d2 = batches.draw(b1, alone, plan, "train"), batches.draw(b2, crowd, plan, "train")
    for side in (0, 1):  # chosen rows first, then rejected
        for x, y in zip(_response(b1, d1, side * 1), _response(b2, d2, side * 4 + 2)):
            assert torch.equal(x, y)
    # Another stream or another epoch is another draw; a second seed too.
    other = batches.draw(b1, [(1, 5)], plan, "train")
    assert not torch.equal(other.masked, d1.masked)
    assert not torch.equal(batches.draw(b1, alone, plan, "ref").masked, d1.masked)


def test_antithetic_draws_share_the_policy_draw_and_the_ablation_does_not():
    tok = build_tiny_tokenizer(vocab_size=136)
    pairs = tokenize_pairs(make_pairs(4, seed=3), tok, max_length=64, progress=False)
    batches = Batches(tok.pad_token_id, torch.device("cpu"), seed=7, mask_token_id=tok.mask_token_id)
    items = [(0, 0), (0, 3)]
    batch = batches.of(pairs, items)
    policy, ref = batches.draws(batch, items, SamplingPlan(n_t=4))
    assert policy is ref
    policy, ref = batches.draws(batch, items, SamplingPlan(n_t=4, antithetic=False))
    assert not torch.equal(policy.masked, ref.masked)
    assert (policy.input_ids[policy.masked] == tok.mask_token_id).all()
