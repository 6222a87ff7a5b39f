"""Mask sampling for the masked-diffusion ELBO: which response tokens each sample hides.

Given a row's response positions and a per-sample *level*, draw one mask per sample:

* ``counts`` (the l-uniform estimator): exactly ``counts[b, j]`` response positions of row ``b``
  are masked, chosen uniformly without replacement;
* ``probs`` (the t-Bernoulli estimator): every response position is masked independently with
  probability ``probs[b, j]``.

Positions outside ``response_mask`` (prompt, padding) are never masked.

Entry point: :func:`sample_masks` with ``impl=``. The ``"torch"`` path draws from a
``torch.Generator``; the ``"triton"`` path derives its bits from ``(seed, position, sample)`` with
Philox, the seed itself drawn from the generator, so the same generator seed reproduces the same
masks (the policy and the reference can share a draw without storing it). The two paths give the
same distribution, not the same bits.
"""

from __future__ import annotations

import torch

from ._triton_utils import aot_spec, on_device
from .dispatch import resolve_impl, triton_available


def _check_inputs(response_mask: torch.Tensor, counts, probs) -> torch.Tensor:
    if response_mask.dtype != torch.bool or response_mask.dim() != 2:
        raise ValueError(
            f"sample_masks: response_mask must be a bool tensor [B, L], got {response_mask.dtype} "
            f"{tuple(response_mask.shape)}"
        )
    if (counts is None) == (probs is None):
        raise ValueError("sample_masks: pass exactly one of counts= (l-uniform) or probs= (t-Bernoulli)")
    level = counts if counts is not None else probs
    if level.dim() != 2 or level.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"sample_masks: {'counts' if counts is not None else 'probs'} must be [B, n] with "
            f"B={response_mask.shape[0]}, got {tuple(level.shape)}"
        )
    if counts is not None:
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError(f"sample_masks: counts must be an integer tensor, got {counts.dtype}")
        lengths = response_mask.sum(-1, keepdim=True)
        bad = (counts < 0) | (counts > lengths)
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"sample_masks: counts[{b}, {j}] = {int(counts[b, j])} is outside [0, {int(lengths[b, 0])}] "
                f"(row {b} has {int(lengths[b, 0])} response positions)"
            )
    else:
        if not probs.dtype.is_floating_point:
            raise ValueError(f"sample_masks: probs must be a float tensor, got {probs.dtype}")
        if ((probs < 0) | (probs > 1) | probs.isnan()).any():
            raise ValueError("sample_masks: probs must lie in [0, 1]")
    return level


def sample_masks_torch(
    response_mask: torch.Tensor,
    counts: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PyTorch mask sampler. Returns bool [B, n, L]; see :func:`sample_masks`."""
    level = _check_inputs(response_mask, counts, probs)
    B, L = response_mask.shape
    n = level.shape[1]
    resp = response_mask[:, None, :].expand(B, n, L)
    if probs is not None:
        u = torch.rand((B, n, L), generator=generator, device=response_mask.device)
        return (u < probs[..., None].to(u.dtype)) & resp
    # Exactly `count` positions: rank random keys among the row's response positions and keep the
    # `count` smallest. Ranking (not thresholding) keeps the count exact even when keys tie;
    # float64 keys make ties (and so any index preference) astronomically rare.
    keys = torch.rand((B, n, L), generator=generator, device=response_mask.device, dtype=torch.float64)
    keys = keys.masked_fill(~resp, 2.0)
    # One sort, then invert the permutation with a scatter (the same ranks as a second argsort).
    order = keys.argsort(dim=-1)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=order.device).expand_as(order))
    return ranks < counts[..., None]


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------
#
# One program per sample s = (b, j) sweeps its row in BLOCK_L chunks. Each position gets a 32-bit
# Philox key from the counter (position, s, 0, 0) under the seed, so any pass can regenerate the keys
# instead of storing them. The counters are uint32 on purpose: with a 64-bit offset, tl.randint of
# Triton 3.2/3.3 returns 64-bit values, which the 32-bit bisection below would get wrong.
#
# l-uniform: the masked set is the `count` response positions with the smallest (key, position). The
# count-th smallest key T is found by bisection on its 32 bits (each step counts the keys <= a probe
# over the row: from registers when the row fits one block, else by regenerating the keys); then every
# key < T is masked, plus the first `count - #(key < T)` positions whose key equals T (a running
# cumsum over the row). The count is therefore exact even with ties, and because the keys are i.i.d.
# uniform the chosen set is uniform over all subsets of that size (up to the ~L / 2^32 chance of a tie
# at the threshold, broken by position).
# t-Bernoulli: a uniform per position from the same key, masked where it is below the level.

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_keys(seed, sample, pos):
        """uint32 Philox keys of positions ``pos`` (int32) of sample ``sample``: counter (pos, sample, 0, 0)."""
        c0 = pos.to(tl.uint32, bitcast=True)
        zero = c0 * 0
        key, _, _, _ = tl.philox(seed, c0, zero + sample.to(tl.uint32, bitcast=True), zero, zero)
        return key

    @triton.jit
    def _response(resp_row, pos, L):
        return tl.load(resp_row + pos, mask=pos < L, other=0) != 0

    @triton.jit
    def _count_keys_at_most(probe, key_block, resp_row, seed, s, L, ONE_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        """How many response positions of the row have a key <= probe (int64 scalar)."""
        if ONE_CHUNK:
            n = tl.sum((key_block <= probe).to(tl.int32), axis=0)
        else:
            hits = tl.zeros((BLOCK_L,), dtype=tl.int32)
            for l0 in range(0, L, BLOCK_L):
                pos = l0 + tl.arange(0, BLOCK_L)
                ok = _response(resp_row, pos, L)
                hits += (ok & (_row_keys(seed, s, pos).to(tl.int64) <= probe)).to(tl.int32)
            n = tl.sum(hits, axis=0)
        return n

    @triton.jit
    def _kth_smallest_key(count, key_block, resp_row, seed, s, L, ONE_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        """T, the count-th smallest key among the response positions, by bisection on its 32 bits.

        Invariant: T in [thr, thr + 2 * step - 1]. For count = 0 the result is 0 (nothing is below it).
        """
        thr = (count * 0).to(tl.int64)
        step = thr + 2147483648
        for _ in range(32):
            probe = thr + step - 1
            below = _count_keys_at_most(probe, key_block, resp_row, seed, s, L, ONE_CHUNK, BLOCK_L)
            thr = tl.where(below >= count, thr, thr + step)
            step = step // 2
        return thr

    @triton.jit
    def _sample_masks_kernel(resp_ptr, level_ptr, masked_ptr, seed, L, n_samples,
                             EXACT: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        s = tl.program_id(0)
        resp_row = resp_ptr + (s // n_samples).to(tl.int64) * L
        out_row = masked_ptr + s.to(tl.int64) * L
        if EXACT:
            count = tl.load(level_ptr + s).to(tl.int32)
            # The first block's keys, excluded positions above every probe: the whole row when ONE_CHUNK.
            pos0 = tl.arange(0, BLOCK_L)
            key0 = tl.where(_response(resp_row, pos0, L), _row_keys(seed, s, pos0).to(tl.int64), 1 << 32)
            thr = _kth_smallest_key(count, key0, resp_row, seed, s, L, ONE_CHUNK, BLOCK_L)
            ties_left = count - _count_keys_at_most(thr - 1, key0, resp_row, seed, s, L, ONE_CHUNK, BLOCK_L)
            ties_seen = count * 0
            for l0 in range(0, L, BLOCK_L):
                pos = l0 + tl.arange(0, BLOCK_L)
                ok = _response(resp_row, pos, L)
                key = _row_keys(seed, s, pos).to(tl.int64)
                tie = ok & (key == thr)
                tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)
                hit = ok & ((key < thr) | (tie & (tie_rank <= ties_left)))
                ties_seen += tl.sum(tie.to(tl.int32), axis=0)
                tl.store(out_row + pos, hit.to(tl.int8), mask=pos < L)
        else:
            p = tl.load(level_ptr + s).to(tl.float32)
            for l0 in range(0, L, BLOCK_L):
                pos = l0 + tl.arange(0, BLOCK_L)
                ok = _response(resp_row, pos, L)
                hit = ok & (tl.uint_to_uniform_float(_row_keys(seed, s, pos)) < p)
                tl.store(out_row + pos, hit.to(tl.int8), mask=pos < L)


# On a GPU a 1024-position chunk covers most responses in one pass; in the interpreter a small chunk
# keeps the tests' rows spanning several chunks.
_GPU_CONFIG = dict(BLOCK_L=1024, num_warps=4, num_stages=2)
_INTERPRETER_CONFIG = dict(BLOCK_L=64, num_warps=4, num_stages=1)


def philox_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A 62-bit Philox seed drawn from ``generator`` (the global RNG of ``device`` when None)."""
    gen_device = generator.device if generator is not None else device
    return int(torch.randint(2**62, (1,), generator=generator, device=gen_device).item())


def sample_masks_triton(response_mask, counts=None, probs=None, generator=None, config=None):
    """Triton mask sampler: bool [B, n, L]. ``config`` overrides the block size (tests)."""
    level = _check_inputs(response_mask, counts, probs)
    B, L = response_mask.shape
    n = level.shape[1]
    dev = response_mask.device
    seed = philox_seed(generator, dev)
    masked = torch.empty((B, n, L), dtype=torch.int8, device=dev)
    if B * n * L:
        cfg = config or (_GPU_CONFIG if dev.type == "cuda" else _INTERPRETER_CONFIG)
        level_arg = counts.long().contiguous() if counts is not None else probs.float().contiguous()
        with on_device(response_mask):
            _sample_masks_kernel[(B * n,)](
                response_mask.contiguous().view(torch.int8), level_arg, masked, seed, L, n,
                EXACT=counts is not None, ONE_CHUNK=L <= cfg["BLOCK_L"], **cfg,
            )
    return masked.view(torch.bool)


def sample_masks(
    response_mask: torch.Tensor,
    counts: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Draw masks over the response positions.

    Args:
        response_mask: bool [B, L]; True on the positions that may be masked.
        counts: int [B, n]; mask exactly this many response positions (0 <= count <= L_b).
        probs: float [B, n]; mask each response position independently with this probability.
        generator: source of randomness (the Triton path draws its Philox seed from it).
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`vrpo_kernels.dispatch`).

    Returns:
        bool [B, n, L], never True outside ``response_mask``.
    """
    impl = resolve_impl(impl, response_mask, "sample_masks", ("auto", "torch", "triton"))
    if impl == "triton":
        return sample_masks_triton(response_mask, counts, probs, generator)
    return sample_masks_torch(response_mask, counts, probs, generator)


def aot_specs() -> list[dict]:
    """The mask kernel's GPU configurations: l-uniform / t-Bernoulli, rows of one chunk or several."""
    if not triton_available():
        return []
    specs = []
    for exact in (True, False):
        for one_chunk in (True, False):
            specs.append(aot_spec(
                f"mask_sampling[{'l_uniform' if exact else 't_bernoulli'},{'one_chunk' if one_chunk else 'chunked'}]",
                _sample_masks_kernel,
                pointers={"resp_ptr": "i8", "level_ptr": "i64" if exact else "fp32", "masked_ptr": "i8"},
                # A 62-bit seed; a row length and a sample count that are not multiples of 16.
                scalars={"seed": 2**61 + 3, "L": 1000 if one_chunk else 4001, "n_samples": 6},
                constexprs={"EXACT": exact, "ONE_CHUNK": one_chunk, "BLOCK_L": _GPU_CONFIG["BLOCK_L"]},
                num_warps=_GPU_CONFIG["num_warps"], num_stages=_GPU_CONFIG["num_stages"],
            ))
    return specs
