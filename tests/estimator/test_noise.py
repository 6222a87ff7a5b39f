"""noisy_draw: the keyed Philox draw, its two implementations (bit for bit), its layout invariance and its law.

The Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set by conftest). Rows of up to 1024
positions are one chunk of the GPU launch configuration (the in-register search), longer ones span
several (each bisection step regenerates the keys); the interpreter's own configuration uses 64-wide
chunks, so the short-row tests cover the chunked sweep too.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from vrpo import SamplingPlan, elbo_estimate, exact_elbo
from vrpo.estimator import elbo_terms
from vrpo.estimator.noise import D1_PROMPT_MASK, NoisyDraw, noisy_draw, one_step_draw
from vrpo_kernels.mask_sampling import _mulhilo, keyed_launch_config, philox4x32

from ..helpers import ToyMDM, assert_unbiased, toy_batch
from ..kernels.test_mask_sampling import chi2_pvalue
from .test_variance import BETA, POLICY, REF, assert_smaller_variance, pairs

IMPLS = ["torch", "triton"]
U32 = 0xFFFFFFFF
MASK_ID = 99

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2), output (4).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def fields(draw) -> tuple[torch.Tensor, ...]:
    return draw.input_ids, draw.masked, draw.weight, draw.levels


def assert_same_bits(a, b):
    for name, x, y in zip(("input_ids", "masked", "weight", "levels"), fields(a), fields(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.is_floating_point():  # bit patterns, so -0.0 != 0.0 and NaN == NaN would be caught too
            x, y = x.view(torch.int32), y.view(torch.int32)
        assert torch.equal(x, y), f"{name} differs at {(x != y).nonzero()[:5].tolist()}"


def random_keys(B: int, seed: int = 0) -> torch.Tensor:
    """B int64 keys over all 64 bits (negative ones included)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (B,), generator=g, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# The Philox core
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_philox_matches_the_published_known_answers(impl):
    """Catches a wrong multiplier, key increment, round count, word order or key split."""
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    want = torch.tensor([w for _, _, w in KAT])
    assert torch.equal(philox4x32(counter, key, impl=impl), want)
    # One key broadcast over several counters gives each counter's own answer.
    assert torch.equal(philox4x32(counter[:1].expand(3, 4), key[0], impl=impl), want[:1].expand(3, 4))


def test_mulhilo_is_exact_where_int64_would_overflow():
    """The 32x32 -> 64-bit product's halves, against Python's big integers, at the extremes."""
    a = torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, U32, 0x9E3779B9])
    for m in (0xD2511F53, 0xCD9E8D57, U32, 1):
        hi, lo = _mulhilo(a, m)
        assert hi.tolist() == [(x * m) >> 32 for x in a.tolist()]
        assert lo.tolist() == [(x * m) & U32 for x in a.tolist()]


def test_philox_rejects_words_outside_32_bits():
    with pytest.raises(ValueError, match="every word of counter"):
        philox4x32(torch.tensor([[2**32, 0, 0, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match=r"key must be an int64 tensor \[\.\.\., 2\]"):
        philox4x32(torch.tensor([[0, 0, 0, 0]]), torch.tensor([0, 0, 0]))


# --------------------------------------------------------------------------------------------------
# The definition, written out in plain Python (module docstring of vrpo_kernels.mask_sampling)
# --------------------------------------------------------------------------------------------------

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox_reference(counter, key):
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + W0) & U32, (k[1] + W1) & U32]
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & U32, (p0 >> 32) ^ c[3] ^ k[1], p0 & U32]
    return c


def reference_row(resp_row: list[bool], key: int, plan: SamplingPlan):
    """One row's (masked positions per sample, weights, levels), scalar by scalar from the docstring."""
    key &= 2**64 - 1
    k = (key & U32, key >> 32)
    positions = [i for i, r in enumerate(resp_row) if r]
    Lb, n_t = len(positions), plan.n_t
    levels, weights = [], []
    for j in range(n_t):
        x0, x1, _, _ = philox_reference((0 if plan.stratified else j, 0, 1, 0), k)
        if plan.estimator == "l_uniform":
            r = ((x1 << 32 | x0) * Lb) >> 64
            level = np.float32((j * Lb + r) // n_t + 1 if plan.stratified else r + 1)
            weight = np.float32(Lb) / level
        else:
            a = x0 >> 8
            num, den = ((n_t - j) * 2**24 - a, n_t * 2**24) if plan.stratified else (2**24 - a, 2**24)
            t = np.float32(np.float64(num) / np.float64(den))
            level = np.float32(np.float32(1 - plan.t_floor) * t) + np.float32(plan.t_floor)
            weight = np.float32(1) / level
        levels.append(level)
        weights += [weight] * plan.n_yt
    masks = []
    for s in range(plan.n):
        K = [philox_reference((p // 4, s, 0, 0), k)[p % 4] for p in range(Lb)]
        level = levels[s // plan.n_yt]
        if plan.estimator == "l_uniform":
            chosen = sorted(range(Lb), key=lambda p: (K[p], p))[: int(level)]
        else:
            chosen = [p for p in range(Lb) if np.float32((K[p] >> 8) * 2.0**-24) < level]
        masks.append(sorted(positions[p] for p in chosen))
    return masks, weights, levels


PLANS = [
    SamplingPlan(n_t=3, n_yt=2),
    SamplingPlan(n_t=4, stratified=True),
    SamplingPlan(n_t=3, n_yt=2, estimator="t_bernoulli"),
    SamplingPlan(n_t=5, estimator="t_bernoulli", stratified=True, t_floor=0.013),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.estimator}-strat{int(p.stratified)}-nyt{p.n_yt}")
def test_torch_draw_is_the_written_definition(plan):
    """The vectorised torch path (histogram select, int64 Philox, gathers) against the scalar definition:
    catches a wrong counter layout or word, a tie broken the wrong way, an off-by-one level."""
    ids, resp = toy_batch([0, 3, 7], [9, 1, 20], vocab=50, pad_to=30)
    resp[2, 12] = False  # a hole: response positions are counted, not row positions
    keys = random_keys(3, seed=1)
    draw = noisy_draw(ids, resp, plan, keys, MASK_ID, impl="torch")
    for b in range(3):
        masks, weights, levels = reference_row(resp[b].tolist(), int(keys[b]), plan)
        assert [row.nonzero()[:, 0].tolist() for row in draw.masked[b]] == masks
        assert draw.weight[b].tolist() == [float(w) for w in weights]
        assert draw.levels[b].tolist() == [float(v) for v in levels]
    assert torch.equal(draw.input_ids, torch.where(draw.masked, MASK_ID, ids[:, None, :]))


# --------------------------------------------------------------------------------------------------
# torch and Triton: the same bits on awkward shapes
# --------------------------------------------------------------------------------------------------


def awkward_batch(L: int, rows: int = 4, seed: int = 0):
    """int64 ids and a response mask [rows, L]: right padding, left padding (response to the row's end),
    a one-token response, and a response with holes, each of a different length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (rows, L), generator=g)
    resp = torch.zeros(rows, L, dtype=torch.bool)
    shapes = [
        lambda r: r.__setitem__(slice(L // 3, L - L // 5), True),
        lambda r: r.__setitem__(slice(L // 2, L), True),
        lambda r: r.__setitem__(L // 4, True),
        lambda r: r.__setitem__(slice(L // 8, L), torch.arange(L - L // 8) % 7 != 3),
    ]
    for b in range(rows):
        shapes[b % 4](resp[b])
    return ids, resp


def gpu_config(L: int, samples: int | None = None) -> dict:
    cfg = keyed_launch_config(L, torch.device("cuda"))
    return cfg if samples is None else {**cfg, "SAMPLES": samples}


L_UNIFORM_PLANS = {1: SamplingPlan(n_t=1), 3: SamplingPlan(n_t=3, stratified=True), 8: SamplingPlan(n_t=4, n_yt=2)}
T_BERNOULLI_PLANS = {
    3: SamplingPlan(n_t=3, estimator="t_bernoulli", stratified=True, t_floor=0.01),
    8: SamplingPlan(n_t=8, estimator="t_bernoulli"),
}
CASES = [("l_uniform", L, n) for L in (1, 2, 1023, 1024, 1025, 8192) for n in (1, 3, 8)]
CASES += [("t_bernoulli", L, n) for L in (1, 2, 1023, 1024, 1025, 8192) for n in (3, 8)]


@pytest.mark.interpreter
@pytest.mark.parametrize("estimator,L,n", CASES)
def test_torch_and_triton_give_the_same_bits(estimator, L, n):
    plan = (L_UNIFORM_PLANS if estimator == "l_uniform" else T_BERNOULLI_PLANS)[n]
    # The GPU's launch configuration (one sample per program). Rows over one 1024-wide chunk cost 34
    # passes each in the interpreter: there all of a row's samples share a program (n > 1), and at
    # L = 8192 there are two rows; the bits do not depend on the launch configuration.
    ids, resp = awkward_batch(L, rows=2 if L > 4096 else 4, seed=L)
    keys = random_keys(ids.shape[0], seed=n)
    config = gpu_config(L, samples=triton_pow2(n) if L > 1024 and n > 1 else None)
    a = noisy_draw(ids, resp, plan, keys, MASK_ID, impl="torch")
    t = _triton(ids, resp, keys, plan, config)
    b = NoisyDraw(masked=t.masked, weight=t.weight, levels=t.levels, plan=plan, input_ids=t.input_ids)
    assert_same_bits(a, b)
    assert not (a.masked & ~resp[:, None, :]).any()
    if estimator == "l_uniform":
        assert torch.equal(a.masked.sum(-1), a.levels.repeat_interleave(plan.n_yt, 1).long())


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _triton(ids, resp, keys, plan, config):
    from vrpo_kernels.mask_sampling import keyed_noisy_draw

    return keyed_noisy_draw(ids, resp, keys, plan, MASK_ID, impl="triton", config=config)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "config",
    [None, dict(BLOCK_L=32, SAMPLES=8), dict(BLOCK_L=128, SAMPLES=1)],
    ids=["interpreter", "chunks32x8", "one_chunk128x1"],
)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.estimator}-strat{int(p.stratified)}-nyt{p.n_yt}")
def test_triton_bits_do_not_depend_on_the_launch_configuration(plan, config):
    """The interpreter's 64-wide chunks, 32-wide ones (three per 70-wide row, eight samples per program:
    the last program partly empty with 5 rows x 6 samples) and one 128-wide chunk per sample, against
    the torch path."""
    ids, resp = awkward_batch(70, rows=5, seed=3)
    keys = random_keys(5, seed=4)
    cfg = None if config is None else {**config, "num_warps": 4, "num_stages": 1}
    assert_same_bits(noisy_draw(ids, resp, plan, keys, MASK_ID, impl="torch"), _triton(ids, resp, keys, plan, cfg))


# --------------------------------------------------------------------------------------------------
# Layout invariance: a sequence's draw depends on its key and its response, nothing else
# --------------------------------------------------------------------------------------------------


def place(tokens: torch.Tensor, resp: torch.Tensor, L: int, left: int):
    """The sequence ``tokens`` / ``resp`` [T] in a row of L after ``left`` padding tokens (id 0)."""
    ids, mask = torch.zeros(L, dtype=torch.int64), torch.zeros(L, dtype=torch.bool)
    ids[left : left + tokens.numel()], mask[left : left + tokens.numel()] = tokens, resp
    return ids, mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.estimator}-strat{int(p.stratified)}-nyt{p.n_yt}")
def test_same_key_and_response_same_draw_whatever_the_batch(plan, impl):
    """The sequence alone; in slot 2 of a batch of others with right padding; left-padded in a wider
    batch. Catches a counter built from row positions or the batch slot, or a key shared by slots."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 50, (23,), generator=g)
    resp = torch.zeros(23, dtype=torch.bool)
    resp[6:] = True
    key = 0x1234_5678_9ABC_DEF0
    layouts = [(23, 0, 0, 1), (40, 0, 2, 4), (61, 30, 1, 3)]  # (L, left padding, slot, batch size)
    seen = []
    for L, left, slot, B in layouts:
        ids, mask = awkward_batch(L, rows=B, seed=L)
        ids[slot], mask[slot] = place(tokens, resp, L, left)
        keys = random_keys(B, seed=L)
        keys[slot] = key
        draw = noisy_draw(ids, mask, plan, keys, MASK_ID, impl=impl)
        span = slice(left, left + 23)
        seen.append((draw.input_ids[slot, :, span], draw.masked[slot, :, span], draw.weight[slot], draw.levels[slot]))
        assert not draw.masked[slot, :, :left].any() and not draw.masked[slot, :, left + 23 :].any()
    for other in seen[1:]:
        for x, y in zip(seen[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("impl", IMPLS)
def test_keys_rows_and_samples_draw_independently(impl):
    """Two copies of a row under one key draw the same; under another key, or as another sample, they
    differ (each repeat has probability about 1 / C(40, 20) here)."""
    ids = torch.zeros(3, 40, dtype=torch.int64)
    resp = torch.ones(3, 40, dtype=torch.bool)
    keys = torch.tensor([7, 7, 8])
    plan = SamplingPlan(n_t=1, n_yt=4, estimator="t_bernoulli", t_floor=0.5)  # p >= 0.5: no empty masks
    draw = noisy_draw(ids, resp, plan, keys, MASK_ID, impl=impl)
    assert torch.equal(draw.masked[0], draw.masked[1])
    rows = {tuple(m.tolist()) for m in draw.masked[1:].reshape(8, 40)}
    assert len(rows) == 8


# --------------------------------------------------------------------------------------------------
# The estimator's law
# --------------------------------------------------------------------------------------------------


def replicated_estimates(model, ids, resp, plan, K, seed, impl):
    """float64 [B, K]: K independent estimates per row (rows replicated K times, one key each)."""
    ids_k, resp_k = ids.repeat_interleave(K, 0), resp.repeat_interleave(K, 0)
    draw = noisy_draw(ids_k, resp_k, plan, random_keys(ids_k.shape[0], seed), model.mask_token_id, impl=impl)
    return elbo_estimate(model, ids_k, resp_k, draw, model.mask_token_id).double().view(ids.shape[0], K)


ENUMERATION_PLANS = [
    SamplingPlan(n_t=2, n_yt=2),
    SamplingPlan(n_t=3, stratified=True),
    SamplingPlan(n_t=2, estimator="t_bernoulli"),
    SamplingPlan(n_t=3, estimator="t_bernoulli", stratified=True),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan", ENUMERATION_PLANS, ids=lambda p: f"{p.estimator}-strat{int(p.stratified)}")
def test_estimate_is_unbiased_against_exact_enumeration(plan, impl):
    """Ragged rows (1 to 6 response tokens, prompts of 0 to 3) with the exact ELBO by enumerating every
    mask; 3000 replicates, each row's mean within 4.5 standard errors."""
    model = ToyMDM(seed=4)
    ids, resp = toy_batch([0, 2, 3, 1], [6, 1, 4, 5], seed=4, pad_to=8)
    exact = exact_elbo(model.logp, ids, resp, model.mask_token_id)
    assert_unbiased(replicated_estimates(model, ids, resp, plan, K=3000, seed=9, impl=impl), exact)


def test_unbiasedness_check_has_power_against_a_wrong_level_law():
    """The check above fails for a draw that skews the levels (l drawn from {1..L_b - 1} when L_b > 1):
    the sample mean moves by far more than its standard error."""
    model = ToyMDM(seed=4)
    ids, resp = toy_batch([0, 1], [6, 5], seed=4, pad_to=8)
    exact = exact_elbo(model.logp, ids, resp, model.mask_token_id)
    K = 3000
    ids_k, resp_k = ids.repeat_interleave(K, 0), resp.repeat_interleave(K, 0)
    draw = noisy_draw(ids_k, resp_k, SamplingPlan(n_t=2), random_keys(2 * K, 9), model.mask_token_id, impl="torch")
    lengths = resp_k.sum(-1, keepdim=True)
    full = draw.masked.sum(-1) == lengths  # samples that masked the whole response: redraw them smaller
    skewed = draw.masked & ~(full[..., None] & (resp_k.cumsum(-1) == lengths)[:, None, :])
    bad = dataclasses.replace(draw, masked=skewed, weight=lengths.float() / skewed.sum(-1).float())
    samples = elbo_estimate(model, ids_k, resp_k, bad, model.mask_token_id).double().view(2, K)
    with pytest.raises(AssertionError):
        assert_unbiased(samples, exact)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_levels_are_uniform_and_stratified_levels_cover_each_stratum_once(impl):
    B, L = 2000, 7
    ids, resp = torch.zeros(B, L, dtype=torch.int64), torch.ones(B, L, dtype=torch.bool)
    iid = noisy_draw(ids, resp, SamplingPlan(n_t=2), random_keys(B, 1), MASK_ID, impl=impl)
    freq = torch.bincount(iid.levels.flatten().long(), minlength=L + 1)[1:]
    assert chi2_pvalue(freq, torch.full((L,), 2 * B / L)) > 1e-3
    strat = noisy_draw(ids, resp, SamplingPlan(n_t=4, stratified=True), random_keys(B, 2), MASK_ID, impl=impl)
    # Level j is floor((j + u) * L) + 1: its stratum of u, [j/4, (j+1)/4), gives levels in
    # [floor(j L / 4) + 1, floor((j + 1) L / 4) + 1].
    j = torch.arange(4.0)
    lo, hi = torch.floor(j * L / 4) + 1, torch.floor((j + 1) * L / 4) + 1
    assert ((strat.levels >= lo) & (strat.levels <= hi)).all()
    torch.testing.assert_close(strat.weight, torch.full_like(strat.levels, L) / strat.levels, rtol=0, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_exact_count_subsets_are_uniform(impl):
    """Response positions 1, 2, 4, 6, 7 of a 9-wide row, l = 2 (rows whose level is 2): all C(5, 2)
    subsets equally likely (chi-square)."""
    S, L = 6000, 9
    resp = torch.zeros(S, L, dtype=torch.bool)
    resp[:, [1, 2, 4, 6, 7]] = True
    draw = noisy_draw(
        torch.zeros(S, L, dtype=torch.int64), resp, SamplingPlan(n_t=1), random_keys(S, 3), MASK_ID, impl=impl
    )
    masked = draw.masked[draw.levels[:, 0] == 2, 0]
    subsets = {s: i for i, s in enumerate(itertools.combinations([1, 2, 4, 6, 7], 2))}
    freq = torch.zeros(len(subsets))
    for row in masked:
        freq[subsets[tuple(row.nonzero()[:, 0].tolist())]] += 1
    assert chi2_pvalue(freq, torch.full((len(subsets),), masked.shape[0] / len(subsets))) > 1e-3, freq


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_t_bernoulli_masks_each_position_with_probability_p(impl):
    """Per level bin, the masked count of 24 positions equals 24 * sum(p) within 5 binomial standard
    errors; t_floor bounds p from below (so the weight by 1 / t_floor)."""
    B, L = 3000, 24
    plan = SamplingPlan(n_t=1, estimator="t_bernoulli", t_floor=0.05)
    ids, resp = torch.zeros(B, L, dtype=torch.int64), torch.ones(B, L, dtype=torch.bool)
    draw = noisy_draw(ids, resp, plan, random_keys(B, 6), MASK_ID, impl=impl)
    p = draw.levels[:, 0].double()
    assert p.min() >= 0.05 and draw.weight.max() <= 1 / 0.05
    hits = draw.masked[:, 0].sum(-1).double()
    for lo in (0.0, 0.25, 0.5, 0.75):
        q = (p > lo) & (p <= lo + 0.25)
        expected, sd = L * p[q].sum(), (L * p[q] * (1 - p[q])).sum().sqrt()
        assert (hits[q].sum() - expected).abs() <= 5 * sd, (lo, hits[q].sum().item(), expected.item())


def score_replicates(plan: SamplingPlan, impl: str, replicates: int, seed: int) -> torch.Tensor:
    """float64 [replicates, 2]: replicates of s_hat for test_variance's two pairs, on keyed draws (the
    reference gets the policy's draw when antithetic, its own keys otherwise)."""
    (ids_w, resp_w), (ids_l, resp_l) = pairs()
    rep = lambda t: t.repeat(replicates, 1)  # noqa: E731
    chosen, rejected = (rep(ids_w), rep(resp_w)), (rep(ids_l), rep(resp_l))
    B = chosen[0].shape[0]
    keys = random_keys(4 * B, seed).view(4, B)

    def draw(batch, k):
        return noisy_draw(*batch, plan, k, POLICY.mask_token_id, impl=impl)

    def estimate(model, batch, d):
        return elbo_estimate(model, *batch, d, model.mask_token_id).double()

    draw_w, draw_l = draw(chosen, keys[0]), draw(rejected, keys[1])
    ref_w, ref_l = (draw_w, draw_l) if plan.antithetic else (draw(chosen, keys[2]), draw(rejected, keys[3]))
    s = BETA * (
        (estimate(POLICY, chosen, draw_w) - estimate(REF, chosen, ref_w))
        - (estimate(POLICY, rejected, draw_l) - estimate(REF, rejected, ref_l))
    )
    return s.view(replicates, 2)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_antithetic_sampling_lowers_variance(impl):
    """Policy and reference on one draw against independent draws; measured ratio ~0.001 (test_variance),
    asserted below 0.1 with 1000 replicates."""
    anti = score_replicates(SamplingPlan(n_t=4), impl, 1000, seed=11).var(0).mean()
    indep = score_replicates(SamplingPlan(n_t=4, antithetic=False), impl, 1000, seed=12).var(0).mean()
    assert anti < 0.1 * indep, (anti, indep)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_stratified_levels_lower_variance(impl):
    """test_variance's one-sided test at three standard errors of the log variance ratio (8000
    replicates; measured gap about 10%)."""
    iid = score_replicates(SamplingPlan(n_t=4), impl, 8000, seed=13)
    strat = score_replicates(SamplingPlan(n_t=4, stratified=True), impl, 8000, seed=14)
    assert_smaller_variance(strat, iid)


# --------------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------------


def test_noisy_draw_reads_like_a_mask_draw_and_takes_a_list_of_keys():
    from vrpo.estimator.sampling import draw_key

    ids, resp = toy_batch([2, 0], [4, 5], vocab=50)
    plan = SamplingPlan(n_t=3)
    keys = [draw_key(0, "train", 0, i, 0) for i in range(2)]
    draw = noisy_draw(ids, resp, plan, keys, MASK_ID)
    assert isinstance(draw, NoisyDraw) and draw.plan is plan and draw.n == 3
    assert draw.input_ids.shape == draw.masked.shape == (2, 3, ids.shape[1]) and draw.input_ids.dtype == torch.int64
    assert draw.weight.shape == (2, 3) and draw.weight.dtype == torch.float32
    assert draw.levels.shape == (2, 3) and draw.levels.dtype == torch.float32
    assert_same_bits(draw, noisy_draw(ids, resp, plan, torch.tensor(keys), MASK_ID))
    assert_same_bits(draw, draw.to("cpu"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ids=lambda ids: ids.int()), "input_ids must be an int64 tensor"),
        (dict(resp=lambda r: r[:, :-1]), "response_mask must be a bool tensor of input_ids' shape"),
        (dict(resp=lambda r: r.long()), "response_mask must be a bool tensor"),
        (dict(keys=lambda k: k[:1]), r"keys must be an int64 tensor \[B\] with B=2"),
        (dict(keys=lambda k: k.int()), "keys must be an int64 tensor"),
        (dict(keys=lambda k: [1, 2.5]), "keys must be 64-bit integers, got 2.5"),
        (dict(keys=lambda k: [1, 2**64]), "keys must be 64-bit integers"),
        (dict(mask_id=-1), "mask_token_id must be an int"),
        (dict(plan="l_uniform"), "plan must be a SamplingPlan"),
        (dict(impl="cuda"), "impl='cuda' is not one of"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    ids, resp = toy_batch([1, 1], [3, 3], vocab=50)
    keys = torch.tensor([1, 2])
    args = dict(ids=ids, resp=resp, plan=SamplingPlan(), keys=keys, mask_id=MASK_ID, impl="torch")
    for name, value in change.items():
        args[name] = value(args[name]) if callable(value) else value
    with pytest.raises(ValueError, match=match):
        noisy_draw(args["ids"], args["resp"], args["plan"], args["keys"], args["mask_id"], impl=args["impl"])


def test_an_empty_response_row_is_an_error_naming_the_row():
    ids, resp = toy_batch([1, 1, 1], [3, 3, 3], vocab=50)
    resp[2] = False
    with pytest.raises(ValueError, match="response_mask row 2 has no response tokens"):
        noisy_draw(ids, resp, SamplingPlan(), [1, 2, 3], MASK_ID)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_empty_batch_gives_empty_outputs(impl):
    draw = noisy_draw(
        torch.zeros(0, 5, dtype=torch.int64),
        torch.zeros(0, 5, dtype=torch.bool),
        SamplingPlan(n_t=2),
        [],
        MASK_ID,
        impl=impl,
    )
    assert draw.input_ids.shape == draw.masked.shape == (0, 2, 5) and draw.levels.shape == (0, 2)


# --------------------------------------------------------------------------------------------------
# The GPU code rounds as the torch path does
# --------------------------------------------------------------------------------------------------

_FLOAT_OPS_SCRIPT = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vrpo_kernels.mask_sampling import KEYED_COMPILE_OPTIONS, _keyed_aot_specs
spec = next(s for s in _keyed_aot_specs() if s["name"].startswith("keyed_draw[t_bernoulli"))
src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"], **KEYED_COMPILE_OPTIONS)
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
print(" ".join(sorted(set(re.findall(r"\\b((?:fma|div|rcp|mad)\\.[a-z.]*f(?:32|64))", ptx)))))
"""


@pytest.mark.aot
def test_gpu_code_has_no_fused_multiply_add_and_only_correctly_rounded_division():
    """The t-Bernoulli kernel compiled for sm_90 with the launch's options (the real compiler, in a fresh
    process without TRITON_INTERPRET): no fma (p = c * t + e rounds twice, as in torch) and only
    div.rn (no approximate division), so the GPU's floats are the torch path's. Catches a launch that
    drops enable_fp_fusion=False, or a plain float32 '/' (Triton emits div.full.f32 for it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", _FLOAT_OPS_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ops = set(run.stdout.split())
    assert {"div.rn.f32", "div.rn.f64"} <= ops, ops
    assert ops <= {"div.rn.f32", "div.rn.f64"}, ops


def test_one_step_draw_is_d1s_estimate():
    """d1's one-step log-likelihood: catches a response token left visible, padding or the prompt masked (or a
    prompt not masked), a weight other than 1, and a prompt mask that depends on the batch."""
    model = ToyMDM(vocab=7, max_len=24)
    ids, resp = toy_batch([12, 6], [4, 5], pad_to=20)
    attention = torch.zeros_like(ids)
    attention[0, :16], attention[1, :11] = 1, 1
    keys = [11, 12]
    draw = one_step_draw(ids, resp, attention, keys, model.mask_token_id)
    assert isinstance(draw, NoisyDraw) and draw.n == 1 and draw.plan.n == 1
    assert torch.equal(draw.masked[:, 0], resp) and torch.equal(draw.weight, torch.ones(2, 1))
    noisy = draw.input_ids[:, 0]
    prompt = attention.bool() & ~resp
    assert (noisy[resp] == model.mask_token_id).all()
    assert torch.equal(noisy[~attention.bool()], ids[~attention.bool()])  # padding untouched
    hidden = (noisy == model.mask_token_id) & prompt
    assert hidden.any() and not hidden[prompt].all()
    logp = model.logp(noisy).gather(-1, ids[..., None])[..., 0]
    terms = elbo_terms(model, ids, resp, draw, model.mask_token_id)
    torch.testing.assert_close(terms[:, 0].double(), (logp * resp).sum(-1), rtol=1e-5, atol=1e-5)
    # Row 1 alone, with 7 more padding columns: the same mask on its tokens.
    pad = lambda t, v: torch.cat([t[1:], torch.full((1, 7), v, dtype=t.dtype)], 1)  # noqa: E731
    alone = one_step_draw(pad(ids, 0), pad(resp, False), pad(attention, 0), keys[1:], model.mask_token_id)
    assert torch.equal(alone.input_ids[0, 0, :20], draw.input_ids[1, 0])
    with pytest.raises(ValueError, match="prompt_mask_prob must be in"):
        one_step_draw(ids, resp, attention, keys, model.mask_token_id, prompt_mask_prob=1.0)
    with pytest.raises(ValueError, match="1 keys for 2 rows"):
        one_step_draw(ids, resp, attention, keys[:1], model.mask_token_id)


def test_one_step_draw_masks_the_prompt_at_d1s_rate():
    """10,000 prompt tokens: the masked fraction is 0.15 within 4.5 standard deviations (catches p or 1 - p)."""
    ids, resp = toy_batch([200] * 50, [1] * 50)
    draw = one_step_draw(ids, resp, torch.ones_like(ids), list(range(50)), MASK_ID)
    prompt = ~resp
    rate = (draw.input_ids[:, 0][prompt] == MASK_ID).double().mean().item()
    sd = (D1_PROMPT_MASK * (1 - D1_PROMPT_MASK) / prompt.sum().item()) ** 0.5
    assert abs(rate - D1_PROMPT_MASK) < 4.5 * sd, rate
