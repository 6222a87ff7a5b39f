"""The Triton kernels: the generator-seeded mask sampler, Philox4x32-10 and the fused keyed draw."""

from __future__ import annotations

from ..dispatch import triton_available
from .common import PHILOX_ROUNDS

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
