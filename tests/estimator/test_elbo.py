"""The Monte Carlo ELBO: unbiased against exact enumeration, edge cases, and the fused path."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrpo import (
    NonFiniteELBOError,
    SamplingPlan,
    draw_masks,
    elbo_estimate,
    elbo_terms,
    exact_elbo,
)
from vrpo.estimator import HeadOptions

from ..helpers import ToyMDM, assert_unbiased, toy_batch


def replicated_estimates(model, ids, resp, plan, K, seed):
    """K independent estimates per row, float64 [B, K] (rows replicated K times, one draw)."""
    g = torch.Generator().manual_seed(seed)
    ids_k, resp_k = ids.repeat_interleave(K, 0), resp.repeat_interleave(K, 0)
    draw = draw_masks(resp_k, plan, generator=g)
    est = elbo_estimate(model, ids_k, resp_k, draw, model.mask_token_id)
    return est.double().view(ids.shape[0], K)


@settings(max_examples=12)
@given(
    plan=st.builds(
        SamplingPlan,
        n_t=st.integers(1, 4),
        n_yt=st.integers(1, 3),
        estimator=st.sampled_from(["l_uniform", "t_bernoulli"]),
        stratified=st.booleans(),
    ),
    rows=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6)), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_estimate_is_unbiased_against_exact_enumeration(plan, rows, seed):
    model = ToyMDM(seed=seed)
    prompts, responses = zip(*rows)
    # Ragged rows: different prompt and response lengths, padded to one width.
    ids, resp = toy_batch(prompts, responses, seed=seed, pad_to=max(p + r for p, r in rows) + 1)
    exact = exact_elbo(model.logp, ids, resp, model.mask_token_id)
    samples = replicated_estimates(model, ids, resp, plan, K=3000, seed=seed)
    assert_unbiased(samples, exact)


def test_exact_elbo_is_a_lower_bound_of_the_exact_likelihood_for_one_token():
    # With one response token the ELBO is exactly log p(y | x): one mask, weight 1.
    model = ToyMDM(seed=3)
    ids, resp = toy_batch([4], [1], seed=3)
    exact = exact_elbo(model.logp, ids, resp, model.mask_token_id)
    masked = ids.clone()
    masked[0, 4] = model.mask_token_id
    torch.testing.assert_close(exact, model.logp(masked)[0, 4, ids[0, 4]].reshape(1))


def test_fixed_draw_matches_hand_computation():
    model = ToyMDM(seed=5)
    ids, resp = toy_batch([2], [3], seed=5)
    draw = draw_masks(resp, SamplingPlan(n_t=2, n_yt=1), generator=torch.Generator().manual_seed(0))
    terms = elbo_terms(model, ids, resp, draw, model.mask_token_id)
    for j in range(2):
        m = draw.masked[0, j]
        noisy = torch.where(m, model.mask_token_id, ids[0])
        logp = model.logp(noisy[None])[0].gather(-1, ids[0][:, None])[:, 0]
        expected = draw.weight[0, j].double() * logp[m].sum()
        torch.testing.assert_close(terms[0, j].double(), expected, rtol=1e-6, atol=1e-6)


def test_prompt_and_padding_are_never_masked():
    ids, resp = toy_batch([3], [2], seed=1, pad_to=8)
    draw = draw_masks(resp, SamplingPlan(n_t=8), generator=torch.Generator().manual_seed(0))
    assert not draw.masked[0, :, :3].any() and not draw.masked[0, :, 5:].any()


def test_mask_token_outside_vocabulary_is_an_error():
    model = ToyMDM()
    ids, resp = toy_batch([1], [3])
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mask_token_id=126336 is outside the model's vocabulary of 7"):
        elbo_estimate(lambda x: model(x.clamp(max=6)), ids, resp, draw, mask_token_id=126336)


def test_nan_logits_are_an_error_not_a_nan_loss():
    model = ToyMDM()
    ids, resp = toy_batch([1, 1], [3, 3])
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(0))

    def broken(x):
        logits = model(x)
        logits[2:] = float("nan")  # the samples of row 1
        return logits

    with pytest.raises(NonFiniteELBOError, match=r"rows \[1\]"):
        elbo_estimate(broken, ids, resp, draw, model.mask_token_id)


def test_draw_from_another_batch_is_rejected():
    model = ToyMDM()
    ids, resp = toy_batch([1, 2], [3, 3])
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="must both be"):
        elbo_estimate(model, ids[:1], resp[:1], draw, model.mask_token_id)
    other = torch.zeros_like(resp)
    other[:, 0] = True  # every draw masks at least one position in 1..4
    with pytest.raises(ValueError, match="outside response_mask"):
        elbo_estimate(model, ids, other, draw, model.mask_token_id)


def test_model_kwargs_are_repeated_per_sample():
    model = ToyMDM()
    ids, resp = toy_batch([1, 2], [3, 2])
    draw = draw_masks(resp, SamplingPlan(n_t=3), generator=torch.Generator().manual_seed(0))
    seen = {}

    def spy(x, bias):
        seen["bias"] = bias
        return model(x) + bias[:, None, None]

    elbo_terms(spy, ids, resp, draw, model.mask_token_id, model_kwargs={"bias": torch.tensor([0.0, 1.0])})
    assert torch.equal(seen["bias"], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))


def tiny_llama(vocab=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("impl", ["eager", "torch"])
def test_fused_head_path_matches_generic_logits_path(impl):
    model = tiny_llama()
    ids, resp = toy_batch([2, 4], [5, 3], vocab=31)
    draw = draw_masks(resp, SamplingPlan(n_t=3, n_yt=2), generator=torch.Generator().manual_seed(0))
    generic = elbo_terms(model, ids, resp, draw, mask_token_id=31, head=HeadOptions(fused=False))
    fused = elbo_terms(model, ids, resp, draw, mask_token_id=31, head=HeadOptions(fused=True, impl=impl))
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-5)
    # ... and the gradients that reach the head and the body.
    grads = []
    for kwargs in (dict(head=HeadOptions(fused=False)), dict(head=HeadOptions(fused=True, impl=impl))):
        model.zero_grad()
        elbo_terms(model, ids, resp, draw, 31, **kwargs).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_true_on_a_plain_callable_is_an_error():
    model = ToyMDM()
    ids, resp = toy_batch([1], [3])
    draw = draw_masks(resp, SamplingPlan(n_t=1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="fused=True needs a transformers LM"):
        elbo_terms(model, ids, resp, draw, model.mask_token_id, head=HeadOptions(fused=True))


def test_exact_elbo_refuses_long_rows():
    model = ToyMDM(max_len=40)
    ids, resp = toy_batch([0], [17], vocab=7)
    with pytest.raises(ValueError, match="enumeration needs <= 16"):
        exact_elbo(model.logp, ids, resp, model.mask_token_id)


def test_unbiasedness_check_has_power_against_a_wrong_weight():
    # The check above must be able to fail: drop the 1/t weights and it does.
    model = ToyMDM(seed=2)
    ids, resp = toy_batch([1, 0], [4, 5], seed=2)
    exact = exact_elbo(model.logp, ids, resp, model.mask_token_id)
    g = torch.Generator().manual_seed(0)
    ids_k, resp_k = ids.repeat_interleave(3000, 0), resp.repeat_interleave(3000, 0)
    draw = draw_masks(resp_k, SamplingPlan(n_t=2), generator=g)
    draw = dataclasses.replace(draw, weight=torch.ones_like(draw.weight))
    samples = elbo_estimate(model, ids_k, resp_k, draw, model.mask_token_id).double().view(2, 3000)
    with pytest.raises(AssertionError):
        assert_unbiased(samples, exact)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [False, True])
def test_packed_terms_equal_unpacked_terms(backend, fused):
    from vrpo.estimator.elbo import packed_elbo_terms
    from vrpo.models import build_tiny_llada

    model = build_tiny_llada(seed=3, vocab_size=128, attn_implementation=backend)
    ids, resp = toy_batch([3, 1, 5], [4, 3, 2], vocab=100, seed=4, pad_to=11)  # ragged: 7, 4, 7 tokens
    lengths = torch.tensor([7, 4, 7])
    attention = (torch.arange(11)[None] < lengths[:, None]).long()
    draw = draw_masks(resp, SamplingPlan(n_t=3, n_yt=2), generator=torch.Generator().manual_seed(0))
    mask_id = model.config.mask_token_id
    plain = elbo_terms(
        model,
        ids,
        resp,
        draw,
        mask_id,
        model_kwargs={"attention_mask": attention},
        head=HeadOptions(fused=fused, impl="torch"),
    )
    packed = packed_elbo_terms(
        model, ids, resp, draw, mask_id, lengths=lengths, row_length=16, head=HeadOptions(fused=fused, impl="torch")
    )
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit rows"):
        packed_elbo_terms(model, ids, resp, draw, mask_id, lengths=lengths, row_length=6)


def _float64_terms_and_fp32_bound(model, ids, resp, draw, mask_id, fused):
    """The ELBO terms of a bf16 model with everything after the model in float64, float64 [B, n], and
    the error bound of computing that part in float32 instead, per term.

    Generic path: the model's own bf16 logits. Fused path: its bf16 hidden states times its bf16 head.
    Float32 error bound, u = 2^-24 (Higham's gamma_n <= 1.01 n u), per masked token:
      logits (fused path only; bf16 values are exact in fp32, the GEMM sums H products in fp32 and the
      log2(e) pre-scaling adds two roundings): |dz| <= (H + 2) u A, A = max_v sum_k |h_k w_vk|;
      log-sum-exp over V logits:                  |d lse| <= |dz| + (V + 4) u (1 + |lse|);
      logp = z_t - lse:                           |d logp| <= 2 |dz| + (V + 4) u (1 + |lse|) + u |logp|.
    A term is weight * (sum over its masked tokens), so |d term| <= weight * count * max |d logp|.
    """
    u = 2.0**-24
    B, n, L = draw.masked.shape
    noisy = torch.where(draw.masked, mask_id, ids[:, None, :]).view(B * n, L)
    with torch.no_grad():
        if fused:
            hidden = model.get_decoder()(input_ids=noisy).last_hidden_state.double()
            weight = model.get_output_embeddings().weight.double()
            z = hidden @ weight.T
            dz = (weight.shape[1] + 2) * u * (hidden.abs() @ weight.abs().T).max().item()
        else:
            z = model(noisy).logits.double()
            dz = 0.0
    lse = z.logsumexp(-1)
    logp = z.gather(-1, ids.repeat_interleave(n, 0)[..., None])[..., 0] - lse
    masked = draw.masked.view(B * n, L)
    terms = (logp * masked).sum(-1).view(B, n) * draw.weight.double()
    V = z.shape[-1]
    per_token = 2 * dz + (V + 4) * u * (1 + lse.abs().max().item()) + u * logp.abs().max().item()
    return terms, draw.weight.double() * draw.masked.sum(-1) * per_token


@pytest.mark.parametrize("fused", [False, True])
def test_terms_are_float32_when_the_model_runs_in_bf16(fused):
    """The log-softmax runs in fp32 on the bf16 model's outputs: the terms are within the fp32 error
    bound of the same terms in float64. A bf16 log-softmax rounds each log p to 8 bits (an error up to
    2^-9 |log p|, ~1e-2 per token here, against a bound of ~5e-5) and fails; so does a 1% weight error
    (checked below to exceed the bound)."""
    from vrpo.models import build_tiny_llada

    model = build_tiny_llada(seed=1, vocab_size=128, dtype=torch.bfloat16)
    ids, resp = toy_batch([2, 3], [5, 4], vocab=100, seed=1)
    draw = draw_masks(resp, SamplingPlan(n_t=3), generator=torch.Generator().manual_seed(0))
    mask_id = model.config.mask_token_id
    terms = elbo_terms(model, ids, resp, draw, mask_id, head=HeadOptions(fused=fused, impl="torch"))
    reference, bound = _float64_terms_and_fp32_bound(model, ids, resp, draw, mask_id, fused)
    assert terms.dtype == torch.float32
    assert (0.01 * reference.abs() > bound).all(), "the bound must be tight enough to see a 1% weight error"
    error = (terms.double() - reference).abs()
    assert (error <= bound).all(), f"error {error.max().item():.3g} over the bound {bound.min().item():.3g}"


@pytest.mark.parametrize(
    "flags, budget",
    [
        ([], 1 << 30),
        (["--ce_max_buffer_mb", "3"], 3 << 20),
        (["--ce_max_buffer_mb", "3", "--packing", "--max_length", "16"], 3 << 20),
    ],
    ids=["default", "set", "set-packed"],
)
def test_ce_max_buffer_mb_reaches_the_op(monkeypatch, flags, budget):
    """--ce_max_buffer_mb -> the run's loading.elbo_module -> ELBOModule -> (packed_)elbo_terms -> masked_linear_ce,
    in bytes; None (the op's own 1 GiB default) when unset."""
    import vrpo.estimator.elbo
    from vrpo.models import build_tiny_llada
    from vrpo.training.config import parse_config
    from vrpo.training.loading import elbo_module

    seen, real = [], vrpo.estimator.elbo.masked_linear_ce

    def spy(*args, **kwargs):
        seen.append(kwargs["max_buffer_bytes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(vrpo.estimator.elbo, "masked_linear_ce", spy)
    model = build_tiny_llada(seed=3, vocab_size=128)
    mask_id = model.config.mask_token_id
    module = elbo_module(model, parse_config(flags), mask_id)
    ids, resp = toy_batch([3, 1], [4, 3], vocab=100, seed=4, pad_to=7)
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(0))
    attention = (torch.arange(7)[None] < torch.tensor([7, 4])[:, None]).long()
    terms = module(ids, resp, draw, attention_mask=attention)
    assert terms.shape == (2, 2) and seen == [budget]
    assert (module.pack_length is not None) == ("--packing" in flags)


def test_the_0_1_head_keywords_still_work_with_a_deprecation_warning():
    """vrpo 0.1's ``elbo_terms(..., fused=, impl=, max_buffer_bytes=)`` (and the same keywords of
    ``elbo_estimate``, ``packed_elbo_terms``, ``masked_token_logprobs`` and ``ELBOModule``) became
    ``head=HeadOptions(...)`` in 0.2: code written against 0.1 raised TypeError. They are accepted for one
    release, with a DeprecationWarning, and mean what they meant."""
    from vrpo.estimator import ELBOModule
    from vrpo.estimator.elbo import masked_token_logprobs, packed_elbo_terms
    from vrpo.models import build_tiny_llada

    model = tiny_llama()
    ids, resp = toy_batch([2, 4], [5, 3], vocab=31)
    draw = draw_masks(resp, SamplingPlan(n_t=3), generator=torch.Generator().manual_seed(0))
    generic = elbo_terms(model, ids, resp, draw, 31, head=HeadOptions(fused=False))
    fused = elbo_terms(model, ids, resp, draw, 31, head=HeadOptions(fused=True, impl="torch"))
    assert not torch.equal(generic, fused)  # the two paths round differently: the keyword must be honoured
    with pytest.warns(DeprecationWarning, match=r"elbo_terms\(fused=False\) is deprecated.*head=HeadOptions"):
        assert torch.equal(elbo_terms(model, ids, resp, draw, 31, fused=False), generic)
    with pytest.warns(DeprecationWarning, match="elbo_terms"):  # 0.1's None meant the default budget
        old = elbo_terms(model, ids, resp, draw, 31, fused=True, impl="torch", max_buffer_bytes=None)
    assert torch.equal(old, fused)
    with pytest.warns(DeprecationWarning, match="elbo_estimate"):
        assert torch.equal(elbo_estimate(model, ids, resp, draw, 31, fused=False), generic.mean(-1))
    with pytest.warns(DeprecationWarning, match="ELBOModule"):
        module = ELBOModule(model, 31, fused=False)
    assert module.head == HeadOptions(fused=False) and torch.equal(module(ids, resp, draw), generic)
    with (
        pytest.warns(DeprecationWarning, match="masked_token_logprobs"),
        pytest.raises(ValueError, match="fused=True needs a transformers LM"),
    ):
        plain = ToyMDM()
        x = torch.zeros(1, 4, dtype=torch.long)
        masked_token_logprobs(plain, x, x, x.bool(), x.float(), plain.mask_token_id, fused=True)
    llada = build_tiny_llada(seed=0)
    lengths = torch.tensor([7, 7])
    with pytest.warns(DeprecationWarning, match="packed_elbo_terms"):
        packed = packed_elbo_terms(
            llada, ids, resp, draw, llada.config.mask_token_id, lengths=lengths, row_length=16, fused=False
        )
    new = packed_elbo_terms(
        llada,
        ids,
        resp,
        draw,
        llada.config.mask_token_id,
        lengths=lengths,
        row_length=16,
        head=HeadOptions(fused=False),
    )
    assert torch.equal(packed, new)
    with pytest.raises(TypeError, match="not both"):
        elbo_terms(model, ids, resp, draw, 31, fused=False, head=HeadOptions(impl="torch"))
    with pytest.raises(TypeError, match="unexpected keyword argument.*'fuse'"):
        elbo_terms(model, ids, resp, draw, 31, fuse=False)
    with pytest.raises(TypeError, match="head must be a HeadOptions"):
        ELBOModule(model, 31, "auto")  # 0.1's third positional argument was fused
