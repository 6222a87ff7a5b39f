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

Keyed draw (:func:`keyed_noisy_draw`): one definition, two implementations with the same bits
------------------------------------------------------------------------------------------------

Every random bit of row ``b``'s draw comes from Philox4x32-10 (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011) under the row's 64-bit key ``k = k1 * 2^32 + k0`` (the two
32-bit key words), at counters that name a sample and a *response position*, never a row position.
Write ``X(c0, c1, c2, c3) = (x0, x1, x2, x3)`` for the four 32-bit output words under key ``k``, and
for a row with ``L_b`` response tokens, ``n = n_t * n_yt`` samples (sample ``s = j * n_yt + m`` is mask
``m`` of level ``j``) and response position ``p = 0..L_b-1`` (the p-th response token of the row in
row order, so prompt, padding and the row's batch slot never change a bit):

Counter layout (``c2`` is a purpose tag)::

    level words     X(j, 0, 1, 0)           j = 0..n_t-1 (stratified: j = 0 only, the row's offset)
    position key    K[s, p] = word (p mod 4) of X(floor(p / 4), s, 0, 0)

Levels. ``R_j(m) = floor((x1 * 2^32 + x0) * m / 2^64)`` with ``(x0, x1)`` the first words of
``X(j, 0, 1, 0)`` is uniform on ``{0..m-1}`` (up to ``m / 2^64`` per value); ``a_j = x0 >> 8`` (24 bits).

* l-uniform: ``l_j = R_j(L_b) + 1``; stratified: ``l_j = floor((j * L_b + R_0(L_b)) / n_t) + 1``, which is
  exactly ``floor(u_j L_b) + 1`` for ``u_j = (j + u) / n_t`` and a uniform offset ``u``.
  Weight ``L_b / l_j`` (float32, correctly rounded).
* t-Bernoulli: ``t_j = (2^24 - a_j) / 2^24``; stratified: ``t_j = (n_t 2^24 - j 2^24 - a_0) / (n_t 2^24)``
  (a float64 quotient rounded to float32), so ``t_j`` lies in ``(0, 1]`` (stratum ``j`` covers
  ``u in [j / n_t, (j + 1) / n_t)``, ``t = 1 - u``). Level ``p_j = fl32(fl32(c * t_j) + e)`` with
  ``c = fl32(1 - t_floor)``, ``e = fl32(t_floor)`` (two roundings, no fused multiply-add), weight
  ``fl32(1 / p_j)``.

Masks of sample ``s`` (level ``j = floor(s / n_yt)``):

* l-uniform: exactly the ``l_j`` response positions with the smallest ``(K[s, p], p)``
  (lexicographic: ties of the 32-bit keys go to the earlier position). Because the keys are
  i.i.d. uniform, the set is uniform over the ``C(L_b, l_j)`` subsets, up to a tie at the boundary
  (probability about ``L_b / 2^33``: 1e-6 at ``L_b = 8192``).
* t-Bernoulli: position ``p`` is masked iff ``(K[s, p] >> 8) * 2^-24 < p_j`` (both exact in float32).

Outputs: ``masked`` [B, n, L], the noisy inputs ``where(masked, mask_token_id, input_ids)``,
``weight`` [B, n] (level ``j``'s weight for each of its ``n_yt`` samples) and ``levels`` [B, n_t].
The torch implementation emulates the uint32 arithmetic in int64 (a 32 x 32-bit product's bit
pattern survives int64's wrap-around) and finds the ``l``-th smallest key by a histogram of the keys'
top bits; the Triton one evaluates the same counters per position and finds it by bisection. The integer parts are
exact, and
the float parts are the correctly rounded IEEE operations listed above, so the bits agree on every
device.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def _sample_masks_kernel(
        resp_ptr,
        level_ptr,
        masked_ptr,
        seed,
        L,
        n_samples,
        EXACT: tl.constexpr,
        ONE_CHUNK: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
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
                response_mask.contiguous().view(torch.int8),
                level_arg,
                masked,
                seed,
                L,
                n,
                EXACT=counts is not None,
                ONE_CHUNK=L <= cfg["BLOCK_L"],
                **cfg,
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
            specs.append(
                aot_spec(
                    f"mask_sampling[{'l_uniform' if exact else 't_bernoulli'},{'one_chunk' if one_chunk else 'chunked'}]",  # noqa: E501
                    _sample_masks_kernel,
                    pointers={"resp_ptr": "i8", "level_ptr": "i64" if exact else "fp32", "masked_ptr": "i8"},
                    # A 62-bit seed; a row length and a sample count that are not multiples of 16.
                    scalars={"seed": 2**61 + 3, "L": 1000 if one_chunk else 4001, "n_samples": 6},
                    constexprs={"EXACT": exact, "ONE_CHUNK": one_chunk, "BLOCK_L": _GPU_CONFIG["BLOCK_L"]},
                    num_warps=_GPU_CONFIG["num_warps"],
                    num_stages=_GPU_CONFIG["num_stages"],
                )
            )
    specs += _keyed_aot_specs()
    return specs


def _keyed_aot_specs() -> list[dict]:
    """The keyed-draw kernel at the GPU configurations: rows of 1000 (in registers), of 4001 (chunked)
    and of 100 (a 128-wide block, one warp), each estimator."""
    specs = []
    for L, stratified in ((1000, False), (4001, True), (100, True)):
        cfg = keyed_launch_config(L, torch.device("cuda"))
        for l_uniform in (True, False):
            specs.append(
                aot_spec(
                    f"keyed_draw[{'l_uniform' if l_uniform else 't_bernoulli'},L={L},"
                    f"block={cfg['BLOCK_L']}x{cfg['SAMPLES']}]",
                    _keyed_draw_kernel,
                    pointers={
                        "ids_ptr": "i64",
                        "resp_ptr": "i8",
                        "keys_ptr": "i64",
                        "noisy_ptr": "i64",
                        "masked_ptr": "i8",
                        "weight_ptr": "fp32",
                        "levels_ptr": "fp32",
                    },
                    scalars={
                        "mask_token_id": 126336,
                        "L": L,
                        "n_samples": 8 * 37,
                        "n_t": 8,
                        "n_yt": 1,
                        "c_floor": 0.999,
                        "e_floor": 1e-3,
                    },
                    constexprs={
                        "L_UNIFORM": l_uniform,
                        "STRATIFIED": stratified,
                        "ONE_CHUNK": L <= cfg["BLOCK_L"],
                        "BLOCK_L": cfg["BLOCK_L"],
                        "SAMPLES": cfg["SAMPLES"],
                    },
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                )
            )
    return specs


# --------------------------------------------------------------------------------------------------
# Keyed draw: Philox4x32-10 in torch (int64 emulation of uint32) and in one Triton kernel
# --------------------------------------------------------------------------------------------------

PHILOX_ROUNDS = 10
# Philox4x32's round multipliers and key increments (Salmon et al. 2011, Section 5; Random123's
# PHILOX_M4x32_0/1 and PHILOX_W32_0/1: the golden ratio and sqrt(3) - 1 in 0.32 fixed point).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF
_TAG_POSITION, _TAG_LEVEL = 0, 1  # counter word c2 (see the module docstring)
_INT64_MAX = 2**63 - 1


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of ``a * m``, for int64 ``a`` in [0, 2^32) and ``m < 2^32``.

    The product needs up to 64 bits, past int64's 63: it wraps modulo 2^64 (two's complement, as every
    torch backend's integer multiply does), so its bit pattern is the unsigned product's, and the
    words are read with an arithmetic shift and a mask (tests check the extremes against Python's ints).
    """
    p = a * m
    return (p >> 32).bitwise_and_(_U32), p.bitwise_and_(_U32)


def philox4x32_words(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast together); four int64 words.

    Random123's round: ``(hi0, lo0) = mulhilo(M0, c0)``, ``(hi1, lo1) = mulhilo(M1, c2)``,
    ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped by ``W`` between rounds.
    Inputs that broadcast (a counter word per position, a key per row) stay small until a round mixes
    them.
    """
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = _xor3(hi1, c1, k0), lo1, _xor3(hi0, c3, k1), lo0
    return c0, c1, c2, c3


def _xor3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a ^ b ^ c`` with one allocation where ``c`` broadcasts into ``a ^ b``."""
    x = torch.bitwise_xor(a, b)
    return x.bitwise_xor_(c) if torch.broadcast_shapes(x.shape, c.shape) == x.shape else x ^ c


def _check_words(name: str, t: torch.Tensor, width: int):
    if t.dtype != torch.int64 or t.dim() < 1 or t.shape[-1] != width:
        raise ValueError(f"philox4x32: {name} must be an int64 tensor [..., {width}], got {t.dtype} {tuple(t.shape)}")
    if ((t < 0) | (t > _U32)).any():
        raise ValueError(f"philox4x32: every word of {name} must lie in [0, 2^32)")


def philox4x32(counter: torch.Tensor, key: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """Philox4x32-10 of each counter under its key: int64 [..., 4] words in [0, 2^32).

    Args:
        counter: int64 [..., 4], four 32-bit words each.
        key: int64 [..., 2] (broadcast against ``counter[..., :2]``), two 32-bit words each.
        impl: ``"torch"`` or ``"triton"`` (``tl.philox``, the generator the keyed-draw kernel uses).
    """
    _check_words("counter", counter, 4)
    _check_words("key", key, 2)
    impl = resolve_impl(impl, counter, "philox4x32", ("torch", "triton"))
    shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    counter, key = counter.expand(*shape, 4), key.expand(*shape, 2)
    if impl == "torch":
        return torch.stack(philox4x32_words(*counter.unbind(-1), *key.unbind(-1)), -1)
    flat_ctr, flat_key = counter.reshape(-1, 4).contiguous(), key.reshape(-1, 2).contiguous()
    out = torch.empty_like(flat_ctr)
    if out.shape[0]:
        with on_device(counter):
            _philox_kernel[(triton.cdiv(out.shape[0], 128),)](flat_ctr, flat_key, out, out.shape[0], BLOCK=128)
    return out.view(*shape, 4)


def _key_words(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k0, k1): the low and high 32-bit words of int64 keys (all 64 bits, as Triton's uint64 cast)."""
    return keys & _U32, (keys >> 32) & _U32


def _uniform_below(x0: torch.Tensor, x1: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``floor((x1 * 2^32 + x0) * m / 2^64)`` exactly, for words x0, x1 and 1 <= m < 2^31: int64 in [0, m)."""
    return (x1 * m + ((x0 * m) >> 32)) >> 32


@dataclass(frozen=True)
class KeyedDraw:
    """The fused draw's outputs, all on the inputs' device.

    Attributes:
        input_ids: int64 [B, n, L]; the mask token where ``masked``, else the input token.
        masked: bool [B, n, L]; True on the masked response positions.
        weight: float32 [B, n]; the estimator weight of each sample.
        levels: float32 [B, n_t]; the mask count ``l`` (l-uniform) or probability ``p`` (t-Bernoulli).
    """

    input_ids: torch.Tensor
    masked: torch.Tensor
    weight: torch.Tensor
    levels: torch.Tensor


def _floor_words(t_floor: float) -> tuple[float, float]:
    """``(fl32(1 - t_floor), fl32(t_floor))``: t-Bernoulli's ``p = c * t + e`` constants, rounded once."""
    c = torch.tensor(1.0 - t_floor, dtype=torch.float32).item()
    e = torch.tensor(t_floor, dtype=torch.float32).item()
    return c, e


def _levels_torch(lengths: torch.Tensor, k0, k1, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(levels, weight)`` [B, n_t] of the module docstring's level rule."""
    dev, n_t = lengths.device, plan.n_t
    j = torch.arange(n_t, device=dev)[None]
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    x0, x1, _, _ = philox4x32_words(
        j[:, :1] if plan.stratified else j, zero, zero + _TAG_LEVEL, zero, k0[:, None], k1[:, None]
    )
    if plan.estimator == "l_uniform":
        L = lengths[:, None]
        r = _uniform_below(x0, x1, L)
        levels = ((j * L + r) // n_t + 1 if plan.stratified else r + 1).float()
        return levels, L.float() / levels
    a = x0 >> 8
    if plan.stratified:
        num, den = (n_t - j) * 2**24 - a, n_t * 2**24
    else:
        num, den = 2**24 - a, 2**24
    t = (num.double() / den).float()
    c, e = _floor_words(plan.t_floor)
    p = t * c + e  # two float32 ops, two roundings (the kernel runs without FMA fusion)
    return p, torch.ones_like(p) / p


def _position_keys_torch(k0, k1, n: int, width: int) -> torch.Tensor:
    """int64 [B, n, width]: ``K[s, p]`` of every row, sample and response position ``p < width``."""
    dev = k0.device
    q = torch.arange((width + 3) // 4, device=dev)[None, None, :]
    s = torch.arange(n, device=dev)[None, :, None]
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    words = philox4x32_words(q, s, zero + _TAG_POSITION, zero, k0[:, None, None], k1[:, None, None])
    return torch.stack(words, -1).flatten(-2)[..., :width]


def _smallest_keys(keys: torch.Tensor, count: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """bool [B, n, P]: for each row b and sample s, the ``count[b, s]`` smallest ``(keys[b, s, p], p)``
    among the positions ``p < length[b]``.

    keys: int64 [B, n, P] in [0, 2^32); count: int64 [B, n] with 1 <= count <= length; length: int64
    [B] <= P. Instead of a sort: a histogram of the keys' top bits (2^bits >= P buckets, under one key
    each on average) locates the bucket T holding the count-th smallest key; everything in a lower
    bucket is masked, and the few keys in bucket T are ranked by ``(key, p)`` on their own.
    """
    B, n, P = keys.shape
    dev = keys.device
    bits = (P - 1).bit_length()
    past_response = (torch.arange(P, device=dev) >= length[:, None])[:, None, :]
    bucket = (keys >> (32 - bits)).masked_fill_(past_response, 1 << bits)  # an overflow bucket
    bucket = bucket.view(B * n, P)
    hist = torch.zeros(B * n, (1 << bits) + 1, dtype=torch.int64, device=dev)
    hist.scatter_add_(1, bucket, torch.ones((), dtype=torch.int64, device=dev).expand(B * n, P))
    cum = hist.cumsum(1)
    T = torch.searchsorted(cum, count.view(B * n, 1))  # the first bucket whose running count reaches count
    in_T = hist.gather(1, T)[:, 0]
    still = count.view(-1) - (cum.gather(1, T)[:, 0] - in_T)  # how many of bucket T's keys to take: 1..in_T
    masked = bucket < T
    # Bucket T's keys, in row order, each row's sorted by (key, p): take the first `still` of each row.
    row, col = (bucket == T).nonzero(as_tuple=True)
    composite = (keys.view(B * n, P)[row, col] << 31) | col  # unique, ordered as (key, p); p < 2^31
    order = composite.argsort(stable=True)
    order = order[row[order].argsort(stable=True)]
    rank = torch.arange(row.numel(), device=dev) - (in_T.cumsum(0) - in_T)[row[order]]
    take = order[rank < still[row[order]]]
    masked[row[take], col[take]] = True
    return masked.view(B, n, P)


def _keyed_draw_torch(input_ids, response_mask, keys, lengths, plan, mask_token_id) -> KeyedDraw:
    B, L = input_ids.shape
    n, n_yt = plan.n_t * plan.n_yt, plan.n_yt
    k0, k1 = _key_words(keys)
    levels, weight = _levels_torch(lengths, k0, k1, plan)
    width = int(lengths.max())
    X = _position_keys_torch(k0, k1, n, width)  # [B, n, width], response-position order
    per_sample = levels.repeat_interleave(n_yt, dim=1)
    if plan.estimator == "l_uniform":
        compact = _smallest_keys(X, per_sample.long(), lengths)
    else:
        # (K >> 8) * 2^-24 < p  <=>  K >> 8 < ceil(p 2^24)  <=>  K < 256 ceil(p 2^24), all exact; positions
        # past the row's response (p >= L_b) never matter: the gather below reads p < L_b only.
        compact = X < (per_sample.double() * 2**24).ceil().long()[..., None] * 256
    rank = (response_mask.cumsum(-1) - 1).clamp(min=0)  # response position of each row position
    masked = compact.gather(-1, rank[:, None, :].expand(B, n, L)) & response_mask[:, None, :]
    noisy = torch.where(masked, torch.as_tensor(mask_token_id, device=input_ids.device), input_ids[:, None, :])
    return KeyedDraw(noisy, masked, weight.repeat_interleave(n_yt, dim=1), levels)


# Each program draws SAMPLES samples g = (b, s) (rows of a [SAMPLES, BLOCK_L] tile) and sweeps their
# rows in BLOCK_L chunks, carrying each sample's count of response positions seen so far, so every
# position knows its response position p (its counter) without a pass over the batch first. Per sample
# it counts L_b, draws the level, finds the l-th smallest (K, p) by bisection on the 32 key bits as
# _sample_masks_kernel does (from registers when the row fits one chunk, else regenerating the keys on
# each of the 33 passes), and writes the noisy ids, the mask, the weight and (for sample m = 0 of each
# level) the level: the whole draw in one launch. On the GPU a program draws one sample; in the
# interpreter many (its cost is per operation), which keeps the tests' statistical draws affordable.

if triton_available():
    _ROUNDS = tl.constexpr(PHILOX_ROUNDS)  # a jit function reads module globals only as constexprs

    @triton.jit
    def _philox_kernel(ctr_ptr, key_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """Philox4x32-10 of N counters (int64 [N, 4]) under their keys (int64 [N, 2]): int64 [N, 4]."""
        i = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ok = i < N
        k0 = tl.load(key_ptr + 2 * i, mask=ok, other=0)
        k1 = tl.load(key_ptr + 2 * i + 1, mask=ok, other=0)
        x0, x1, x2, x3 = tl.philox(
            (k1 << 32) | k0,
            tl.load(ctr_ptr + 4 * i, mask=ok, other=0).to(tl.uint32),
            tl.load(ctr_ptr + 4 * i + 1, mask=ok, other=0).to(tl.uint32),
            tl.load(ctr_ptr + 4 * i + 2, mask=ok, other=0).to(tl.uint32),
            tl.load(ctr_ptr + 4 * i + 3, mask=ok, other=0).to(tl.uint32),
            _ROUNDS,
        )
        tl.store(out_ptr + 4 * i, x0.to(tl.int64), mask=ok)
        tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64), mask=ok)
        tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64), mask=ok)
        tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64), mask=ok)

    @triton.jit
    def _chunk(resp_rows, live, l0, seen, L, BLOCK_L: tl.constexpr):
        """The chunk at ``l0`` of each sample's row (``resp_rows``: [SAMPLES, 1] pointers): row positions
        ``pos`` [BLOCK_L], which are response positions (``ok`` [SAMPLES, BLOCK_L]), their response
        position ``p`` (``seen`` [SAMPLES] response positions precede the chunk) and the new ``seen``."""
        pos = l0 + tl.arange(0, BLOCK_L)
        ok = tl.load(resp_rows + pos[None, :], mask=live[:, None] & (pos < L)[None, :], other=0) != 0
        p = seen[:, None] + tl.cumsum(ok.to(tl.int32), axis=1) - 1
        return pos, ok, p, seen + tl.sum(ok.to(tl.int32), axis=1)

    @triton.jit
    def _position_keys(seed, s, p):
        """uint32 K[s, p] [SAMPLES, BLOCK_L]: word (p mod 4) of Philox(seed) at (p // 4, s, TAG_POSITION, 0)."""
        q = (p >> 2).to(tl.uint32)
        zero = q * 0
        x0, x1, x2, x3 = tl.philox(
            seed[:, None], q, zero + s.to(tl.uint32)[:, None], zero + 0, zero, _ROUNDS
        )  # c2 = 0: _TAG_POSITION
        w = p & 3
        return tl.where(w == 0, x0, tl.where(w == 1, x1, tl.where(w == 2, x2, x3)))

    @triton.jit
    def _keys_at_most(probe, key_block, resp_rows, live, seed, s, L, ONE_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        """int32 [SAMPLES]: how many response positions of each row have K[s, p] <= probe [SAMPLES]."""
        if ONE_CHUNK:
            n = tl.sum((key_block <= probe[:, None]).to(tl.int32), axis=1)
        else:
            n = probe.to(tl.int32) * 0
            seen = n
            for l0 in range(0, L, BLOCK_L):
                pos, ok, p, seen = _chunk(resp_rows, live, l0, seen, L, BLOCK_L)
                below = ok & (_position_keys(seed, s, p).to(tl.int64) <= probe[:, None])
                n += tl.sum(below.to(tl.int32), axis=1)
        return n

    @triton.jit
    def _kth_key(count, key_block, resp_rows, live, seed, s, L, ONE_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        """int64 [SAMPLES]: the count-th smallest key of each row's response positions, by bisection on
        its 32 bits. Invariant: the answer lies in [thr, thr + 2 * step - 1]."""
        thr = (count * 0).to(tl.int64)
        step = thr + 2147483648
        for _ in range(32):
            probe = thr + step - 1
            below = _keys_at_most(probe, key_block, resp_rows, live, seed, s, L, ONE_CHUNK, BLOCK_L)
            thr = tl.where(below >= count, thr, thr + step)
            step = step // 2
        return thr

    @triton.jit
    def _level(seed, j, length, n_t, c_floor, e_floor, L_UNIFORM: tl.constexpr, STRATIFIED: tl.constexpr):
        """float32 (level, weight) [SAMPLES] of level j [SAMPLES] of rows with ``length`` response positions."""
        jc = j * 0 if STRATIFIED else j
        zero = jc.to(tl.uint32) * 0
        x0, x1, _, _ = tl.philox(seed, jc.to(tl.uint32), zero, zero + 1, zero, _ROUNDS)  # c2 = 1: _TAG_LEVEL
        x0 = x0.to(tl.int64)
        if L_UNIFORM:
            lb = length.to(tl.int64)
            r = (x1.to(tl.int64) * lb + ((x0 * lb) >> 32)) >> 32
            if STRATIFIED:
                count = (j.to(tl.int64) * lb + r) // n_t + 1
            else:
                count = r + 1
            level = count.to(tl.float32)
            weight = tl.math.div_rn(lb.to(tl.float32), level)
        else:
            a = x0 >> 8
            if STRATIFIED:
                num = (n_t - j).to(tl.int64) * 16777216 - a
                den = num * 0 + n_t * 16777216
            else:
                num = 16777216 - a
                den = num * 0 + 16777216
            t = (num.to(tl.float64) / den.to(tl.float64)).to(tl.float32)  # fp64 division is div.rn
            level = t * c_floor + e_floor  # launched with enable_fp_fusion=False: two roundings
            weight = tl.math.div_rn(level * 0 + 1.0, level)
        return level, weight

    @triton.jit
    def _store_chunk(hit, pos, live, ids_rows, noisy_rows, masked_rows, mask_token_id, L):
        inside = live[:, None] & (pos < L)[None, :]
        ids = tl.load(ids_rows + pos[None, :], mask=inside, other=0)
        tl.store(noisy_rows + pos[None, :], tl.where(hit, mask_token_id, ids).to(tl.int64), mask=inside)
        tl.store(masked_rows + pos[None, :], hit.to(tl.int8), mask=inside)

    @triton.jit
    def _keyed_draw_kernel(
        ids_ptr,
        resp_ptr,
        keys_ptr,
        noisy_ptr,
        masked_ptr,
        weight_ptr,
        levels_ptr,
        mask_token_id,
        L,
        n_samples,
        n_t,
        n_yt,
        c_floor,
        e_floor,
        L_UNIFORM: tl.constexpr,
        STRATIFIED: tl.constexpr,
        ONE_CHUNK: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SAMPLES: tl.constexpr,
    ):
        g = tl.program_id(0) * SAMPLES + tl.arange(0, SAMPLES)  # samples b * n + s of this program
        live = g < n_samples
        g = tl.where(live, g, 0).to(tl.int64)
        n = n_t * n_yt
        b = g // n
        s = (g % n).to(tl.int32)
        j = s // n_yt
        seed = tl.load(keys_ptr + b)
        resp_rows = (resp_ptr + b * L)[:, None]
        ids_rows = (ids_ptr + b * L)[:, None]
        noisy_rows = (noisy_ptr + g * L)[:, None]
        masked_rows = (masked_ptr + g * L)[:, None]
        # The first chunk in registers (the whole row when ONE_CHUNK), then each row's length L_b.
        pos0, ok0, p0, length = _chunk(resp_rows, live, 0, s * 0, L, BLOCK_L)
        if not ONE_CHUNK:
            for l0 in range(BLOCK_L, L, BLOCK_L):
                _, _, _, length = _chunk(resp_rows, live, l0, length, L, BLOCK_L)
        level, weight = _level(seed, j, tl.maximum(length, 1), n_t, c_floor, e_floor, L_UNIFORM, STRATIFIED)
        tl.store(weight_ptr + g, weight, mask=live)
        tl.store(levels_ptr + b * n_t + j, level, mask=live & ((s % n_yt) == 0))
        if L_UNIFORM:
            count = level.to(tl.int32)
            key0 = tl.where(ok0, _position_keys(seed, s, p0).to(tl.int64), 1 << 32)
            thr = _kth_key(count, key0, resp_rows, live, seed, s, L, ONE_CHUNK, BLOCK_L)
            ties_left = count - _keys_at_most(thr - 1, key0, resp_rows, live, seed, s, L, ONE_CHUNK, BLOCK_L)
            if ONE_CHUNK:
                tie = key0 == thr[:, None]
                first_ties = tl.cumsum(tie.to(tl.int32), axis=1) <= ties_left[:, None]
                hit = ok0 & ((key0 < thr[:, None]) | (tie & first_ties))
                _store_chunk(hit, pos0, live, ids_rows, noisy_rows, masked_rows, mask_token_id, L)
            else:
                ties_seen = count * 0
                seen = count * 0
                for l0 in range(0, L, BLOCK_L):
                    pos, ok, p, seen = _chunk(resp_rows, live, l0, seen, L, BLOCK_L)
                    key = _position_keys(seed, s, p).to(tl.int64)
                    tie = ok & (key == thr[:, None])
                    first_ties = ties_seen[:, None] + tl.cumsum(tie.to(tl.int32), axis=1) <= ties_left[:, None]
                    hit = ok & ((key < thr[:, None]) | (tie & first_ties))
                    ties_seen += tl.sum(tie.to(tl.int32), axis=1)
                    _store_chunk(hit, pos, live, ids_rows, noisy_rows, masked_rows, mask_token_id, L)
        else:
            seen = s * 0
            for l0 in range(0, L, BLOCK_L):
                pos, ok, p, seen = _chunk(resp_rows, live, l0, seen, L, BLOCK_L)
                u = (_position_keys(seed, s, p) >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, exact
                _store_chunk(ok & (u < level[:, None]), pos, live, ids_rows, noisy_rows, masked_rows, mask_token_id, L)


# Launch settings of the keyed-draw kernel: BLOCK_L is the row length rounded up to a power of two, at
# most MAX_BLOCK_L (longer rows are swept in chunks). On the GPU one sample a program, with a warp per
# 256 positions (several samples a program spill registers at sm_90 for t-Bernoulli); in the
# interpreter, whose cost is per operation, a tile of TILE positions (many samples a program), and
# 64-wide chunks so that the tests' rows span several.
_KEYED_GPU = dict(MAX_BLOCK_L=1024, num_stages=1)
# No fused multiply-add: t-Bernoulli's p = c * t + e must round twice, as the torch path does.
KEYED_COMPILE_OPTIONS = dict(enable_fp_fusion=False)
_KEYED_INTERPRETER = dict(MAX_BLOCK_L=64, TILE=16384, num_warps=4, num_stages=1)


def keyed_launch_config(L: int, device: torch.device) -> dict:
    """``BLOCK_L``, ``SAMPLES``, ``num_warps`` and ``num_stages`` of the keyed-draw kernel for rows of L."""
    if device.type == "cuda":
        block = min(_KEYED_GPU["MAX_BLOCK_L"], triton.next_power_of_2(max(L, 32)))
        return dict(
            BLOCK_L=block, SAMPLES=1, num_warps=min(4, max(1, block // 256)), num_stages=_KEYED_GPU["num_stages"]
        )
    t = _KEYED_INTERPRETER
    block = min(t["MAX_BLOCK_L"], triton.next_power_of_2(max(L, 2)))
    return dict(BLOCK_L=block, SAMPLES=t["TILE"] // block, num_warps=t["num_warps"], num_stages=t["num_stages"])


def _keyed_draw_triton(input_ids, response_mask, keys, plan, mask_token_id, config=None) -> KeyedDraw:
    B, L = input_ids.shape
    n = plan.n_t * plan.n_yt
    dev = input_ids.device
    noisy = torch.empty((B, n, L), dtype=torch.int64, device=dev)
    masked = torch.empty((B, n, L), dtype=torch.int8, device=dev)
    weight = torch.empty((B, n), dtype=torch.float32, device=dev)
    levels = torch.empty((B, plan.n_t), dtype=torch.float32, device=dev)
    if B * L:
        cfg = config or keyed_launch_config(L, dev)
        c, e = _floor_words(plan.t_floor)
        with on_device(input_ids):
            _keyed_draw_kernel[(triton.cdiv(B * n, cfg["SAMPLES"]),)](
                input_ids.contiguous(),
                response_mask.contiguous().view(torch.int8),
                keys.contiguous(),
                noisy,
                masked,
                weight,
                levels,
                mask_token_id,
                L,
                B * n,
                plan.n_t,
                plan.n_yt,
                c,
                e,
                L_UNIFORM=plan.estimator == "l_uniform",
                STRATIFIED=plan.stratified,
                ONE_CHUNK=L <= cfg["BLOCK_L"],
                **KEYED_COMPILE_OPTIONS,
                **cfg,
            )
    return KeyedDraw(noisy, masked.view(torch.bool), weight, levels)


def _check_keyed_inputs(input_ids, response_mask, keys, plan, mask_token_id) -> torch.Tensor:
    """Validate the keyed draw's arguments; returns the rows' response lengths (int64 [B])."""
    if input_ids.dtype != torch.int64 or input_ids.dim() != 2:
        raise ValueError(
            f"noisy_draw: input_ids must be an int64 tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if response_mask.dtype != torch.bool or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"noisy_draw: response_mask must be a bool tensor of input_ids' shape "
            f"{tuple(input_ids.shape)}, got {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    if keys.dtype != torch.int64 or keys.shape != input_ids.shape[:1]:
        raise ValueError(
            f"noisy_draw: keys must be an int64 tensor [B] with B={input_ids.shape[0]}, got "
            f"{keys.dtype} {tuple(keys.shape)}"
        )
    if response_mask.device != input_ids.device or keys.device != input_ids.device:
        raise ValueError(
            f"noisy_draw: response_mask ({response_mask.device}) and keys ({keys.device}) must be "
            f"on input_ids' device ({input_ids.device})"
        )
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < 2**31:
        raise ValueError(f"noisy_draw: mask_token_id must be an int in [0, 2^31), got {mask_token_id!r}")
    if input_ids.shape[1] >= 2**31:
        raise ValueError(f"noisy_draw: rows of {input_ids.shape[1]} tokens are past the 2^31 the counters hold")
    lengths = response_mask.sum(-1)
    empty = (lengths == 0).nonzero()
    if empty.numel():
        rows = empty[:, 0].tolist()
        raise ValueError(
            f"noisy_draw: response_mask row {rows[0]} has no response tokens (empty rows: "
            f"{rows[:10]}); every sequence needs at least one to estimate its ELBO"
        )
    return lengths


def keyed_noisy_draw(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    keys: torch.Tensor,
    plan,
    mask_token_id: int,
    impl: str = "auto",
    config: dict | None = None,
) -> KeyedDraw:
    """The keyed draw of the module docstring, fused with writing the noisy inputs.

    Args:
        input_ids: int64 [B, L].
        response_mask: bool [B, L]; True on the response tokens that may be masked; every row needs one.
        keys: int64 [B]; row ``b``'s 64-bit Philox key (its bits, so negative values are keys too).
        plan: anything with ``n_t``, ``n_yt``, ``estimator`` (``"l_uniform"`` or ``"t_bernoulli"``),
            ``stratified`` and ``t_floor`` (``vrpo``'s ``SamplingPlan``).
        mask_token_id: the id written where a token is masked.
        impl: ``"auto"`` (Triton on CUDA), ``"torch"`` or ``"triton"``: the same bits.
        config: Triton block size and launch settings (tests); None picks the device's.

    Returns:
        A :class:`KeyedDraw` on ``input_ids``' device: ids [B, n, L], masked [B, n, L], weight [B, n],
        levels [B, n_t].
    """
    lengths = _check_keyed_inputs(input_ids, response_mask, keys, plan, mask_token_id)
    impl = resolve_impl(impl, input_ids, "noisy_draw", ("auto", "torch", "triton"))
    if impl == "triton":
        return _keyed_draw_triton(input_ids, response_mask, keys, plan, mask_token_id, config)
    if input_ids.shape[0] == 0:  # nothing to draw (and no longest response to size the keys by)
        B, L, n, dev = 0, input_ids.shape[1], plan.n_t * plan.n_yt, input_ids.device
        return KeyedDraw(
            input_ids.new_empty((B, n, L)),
            torch.empty((B, n, L), dtype=torch.bool, device=dev),
            torch.empty((B, n), device=dev),
            torch.empty((B, plan.n_t), device=dev),
        )
    return _keyed_draw_torch(input_ids, response_mask, keys, lengths, plan, mask_token_id)
