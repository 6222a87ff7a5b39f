"""sample_masks: support, exact counts, distribution and seeding, for the torch and Triton paths.

The Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set by conftest); its rows span one
64-position chunk (the in-register search) or several (the chunked search).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vrpo import SamplingPlan, draw_masks
from vrpo_kernels import sample_masks

IMPLS = ["torch", "triton"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ragged_response(B, L, seed=0):
    """bool [B, L]: each row a prompt, then a response, then padding, with one hole in the response."""
    g = gen(seed)
    resp = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, L // 3, (1,), generator=g))
        end = int(torch.randint(start + 2, L + 1, (1,), generator=g))
        resp[b, start:end] = True
        resp[b, (start + end) // 2] = False
    return resp


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit, p-value from the regularised upper incomplete gamma."""
    stat = ((observed.double() - expected.double()) ** 2 / expected.double()).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L", [40, 150], ids=["one-chunk", "chunked"])
def test_exact_count_and_never_outside_response(impl, L):
    B, n = 4, 3
    resp = ragged_response(B, L)
    lengths = resp.sum(-1)
    g = gen(1)
    counts = torch.stack([torch.randint(0, int(lb) + 1, (n,), generator=g) for lb in lengths])
    counts[0, 0], counts[1, 0] = 0, lengths[1]  # both ends of the range
    masked = sample_masks(resp, counts=counts, generator=gen(2), impl=impl)
    assert masked.dtype == torch.bool and masked.shape == (B, n, L)
    assert not (masked & ~resp[:, None, :]).any()
    assert torch.equal(masked.sum(-1), counts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L", [40, 150], ids=["one-chunk", "chunked"])
def test_bernoulli_never_outside_response(impl, L):
    resp = ragged_response(3, L, seed=3)
    probs = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.9, 1.0], [1.0, 1.0, 0.0]])
    masked = sample_masks(resp, probs=probs, generator=gen(4), impl=impl)
    assert not (masked & ~resp[:, None, :]).any()
    assert torch.equal(masked[probs == 1.0], resp[:, None, :].expand_as(masked)[probs == 1.0])
    assert not masked[probs == 0.0].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bernoulli_frequencies_match_t(impl):
    # 64 rows x 4 levels; positions are i.i.d. Bernoulli(p), so the masked count per level is
    # Binomial(64 * L_resp, p): compare with a chi-square over the two outcomes of each level.
    B, L = 64, 30
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, 4:28] = True
    probs = torch.tensor([0.05, 0.3, 0.5, 0.85]).expand(B, 4).contiguous()
    # A fixed draw: each level's check fails by chance with probability 1e-3 (the Triton bits changed
    # with its 32-bit Philox counters, and seed 5 fell at z = 3.5 there; over 20 seeds z has sd 1.04).
    masked = sample_masks(resp, probs=probs, generator=gen(6), impl=impl)
    trials = B * 24
    for j, p in enumerate(probs[0].tolist()):
        hits = masked[:, j].sum()
        observed = torch.stack([hits, trials - hits])
        expected = torch.tensor([trials * p, trials * (1 - p)])
        assert chi2_pvalue(observed, expected) > 1e-3, (p, int(hits), trials)
    # ... and no position is favoured: per-position counts at p = 0.5 are uniform.
    per_pos = masked[:, 2, 4:28].sum(0)
    assert chi2_pvalue(per_pos, torch.full((24,), per_pos.sum() / 24.0)) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_count_subsets_are_uniform(impl):
    # L_b = 5, count 2: all C(5, 2) = 10 subsets must be equally likely.
    S, L = 240, 9
    resp = torch.zeros(S, L, dtype=torch.bool)
    resp[:, [1, 2, 4, 6, 7]] = True
    masked = sample_masks(resp, counts=torch.full((S, 1), 2), generator=gen(6), impl=impl)[:, 0]
    subsets = list(itertools.combinations([1, 2, 4, 6, 7], 2))
    index = {s: i for i, s in enumerate(subsets)}
    freq = torch.zeros(len(subsets))
    for row in masked:
        freq[index[tuple(row.nonzero()[:, 0].tolist())]] += 1
    assert chi2_pvalue(freq, torch.full((len(subsets),), S / len(subsets))) > 1e-3, freq


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_count_positions_are_uniform_in_long_rows(impl):
    # A 100-position response spans two interpreter chunks: each position is masked with
    # probability count / L_b whatever its chunk.
    from vrpo_kernels.mask_sampling import _INTERPRETER_CONFIG

    S, L, start, L_b, count = 48, 110, 5, 100, 30
    resp = torch.zeros(S, L, dtype=torch.bool)
    resp[:, start : start + L_b] = True
    masked = sample_masks(resp, counts=torch.full((S, 1), count), generator=gen(7), impl=impl)
    masked = masked[:, 0, start : start + L_b]
    per_pos = masked.sum(0)
    assert chi2_pvalue(per_pos, torch.full((L_b,), S * count / L_b)) > 1e-3
    # Response positions in the kernel's first chunk (row positions < BLOCK_L) and in the later ones:
    # each side gets its share count * (positions on that side) / L_b of the masks.
    in_first = _INTERPRETER_CONFIG["BLOCK_L"] - start
    assert 0 < in_first < L_b, "the response must span two chunks"
    sides = torch.stack([per_pos[:in_first].sum(), per_pos[in_first:].sum()])
    assert chi2_pvalue(sides, S * count * torch.tensor([in_first, L_b - in_first]) / L_b) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["counts", "probs"])
def test_same_seed_same_masks_different_seed_different(impl, kind):
    resp = ragged_response(3, 50, seed=8)
    level = (
        dict(counts=torch.minimum(torch.tensor([[3, 9], [1, 4], [7, 2]]), resp.sum(-1, keepdim=True)))
        if kind == "counts"
        else dict(probs=torch.full((3, 2), 0.4))
    )
    a = sample_masks(resp, **level, generator=gen(11), impl=impl)
    b = sample_masks(resp, **level, generator=gen(11), impl=impl)
    c = sample_masks(resp, **level, generator=gen(12), impl=impl)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.interpreter
@pytest.mark.parametrize("L", [1, 1023, 1024, 1025, pytest.param(8192, marks=pytest.mark.slow)])
def test_triton_exact_counts_with_the_gpu_block(L):
    """The GPU's 1024-position block: rows of one block (L <= 1024, in-register search) and of several
    (each bisection step regenerates the keys). Counts at both ends and inside, with a response that
    skips position 0 and ends before the row does. Rows over one block cost 33 passes each in the
    interpreter, so they get two samples."""
    from vrpo_kernels.mask_sampling import _GPU_CONFIG, sample_masks_triton

    resp = torch.ones(2, L, dtype=torch.bool)
    if L > 2:
        resp[1, 0] = resp[1, -1] = False
    if L > _GPU_CONFIG["BLOCK_L"]:
        resp = resp[1:]
    lengths = resp.sum(-1).tolist()
    per_row = (
        (lambda lb: [lb // 2, lb - 1]) if L > _GPU_CONFIG["BLOCK_L"] else (lambda lb: [0, lb, lb // 2, max(lb - 1, 0)])
    )
    counts = torch.tensor([per_row(lb) for lb in lengths])
    masked = sample_masks_triton(resp, counts=counts, generator=gen(L), config=_GPU_CONFIG)
    assert torch.equal(masked.sum(-1), counts)
    assert not (masked & ~resp[:, None, :]).any()
    if L >= 1023:  # a half-full row: the masked positions spread over the whole row, not a prefix
        half = masked[-1, counts.shape[1] - 2 if L > _GPU_CONFIG["BLOCK_L"] else 2].nonzero()[:, 0]
        assert half.min() < L // 8 and half.max() > L - L // 8


def test_torch_path_keeps_its_bits():
    # The single-sort ranking gives exactly the masks of the former double argsort.
    resp = ragged_response(5, 33, seed=4)
    counts = torch.minimum(torch.tensor([[3], [5], [1], [8], [2]]), resp.sum(-1, keepdim=True))
    got = sample_masks(resp, counts=counts, generator=gen(21), impl="torch")
    keys = torch.rand((5, 1, 33), generator=gen(21), dtype=torch.float64).masked_fill(~resp[:, None, :], 2.0)
    assert torch.equal(got, keys.argsort(-1).argsort(-1) < counts[..., None])


@pytest.mark.parametrize("estimator", ["l_uniform", "t_bernoulli"])
def test_draw_masks_through_the_triton_kernel(estimator):
    resp = ragged_response(3, 24, seed=5)
    plan = SamplingPlan(n_t=3, n_yt=2, estimator=estimator)
    draw = draw_masks(resp, plan, generator=gen(3), impl="triton")
    again = draw_masks(resp, plan, generator=gen(3), impl="triton")
    assert torch.equal(draw.masked, again.masked) and torch.equal(draw.weight, again.weight)
    assert draw.masked.shape == (3, 6, 24) and not (draw.masked & ~resp[:, None, :]).any()
    if estimator == "l_uniform":
        assert torch.equal(draw.masked.sum(-1), draw.levels.repeat_interleave(2, 1).long())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(counts=torch.tensor([[1], [99]])), r"counts\[1, 0\] = 99 is outside"),
        (dict(counts=torch.tensor([[-1], [1]])), r"counts\[0, 0\] = -1 is outside"),
        (dict(counts=torch.tensor([[1.0], [1.0]])), "counts must be an integer"),
        (dict(probs=torch.tensor([[0.5], [1.5]])), r"probs must lie in \[0, 1\]"),
        (dict(counts=torch.tensor([[1]])), "counts must be"),
    ],
)
def test_bad_inputs_name_the_argument(impl, kwargs, match):
    resp = torch.zeros(2, 10, dtype=torch.bool)
    resp[:, 2:6] = True
    with pytest.raises(ValueError, match=match):
        sample_masks(resp, **kwargs, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_samples_and_rows_are_drawn_independently(impl):
    # Every (row, sample) has its own random stream: same row and count, or same count in a copy
    # of the row, never repeat a mask (a repeat has probability about 1 / C(40, 10) here).
    resp = torch.ones(2, 40, dtype=torch.bool)
    masked = sample_masks(resp, counts=torch.full((2, 4), 10), generator=gen(14), impl=impl).view(8, 40)
    assert len({tuple(m.tolist()) for m in masked}) == 8
