"""Mask sampling for the masked-diffusion ELBO: which response tokens each sample hides.

Given a row's response positions and a per-sample *level*, draw one mask per sample:

* ``counts`` (the l-uniform estimator): exactly ``counts[b, j]`` response positions of row ``b``
  are masked, chosen uniformly without replacement;
* ``probs`` (the t-Bernoulli estimator): every response position is masked independently with
  probability ``probs[b, j]``.

Positions outside ``response_mask`` (prompt, padding) are never masked.

Entry point: :func:`sample_masks` with ``impl=``. The ``"torch"`` path draws from a
``torch.Generator``; the ``"triton"`` path derives its bits from ``(seed, offset)`` with Philox, the
seed itself drawn from the generator, so the same generator seed reproduces the same masks (the
policy and the reference can share a draw without storing it). The two paths give the same
distribution, not the same bits.

Optionally (``input_ids=``, ``mask_token_id=``) the noisy inputs are written in the same pass.
"""

from __future__ import annotations

import torch

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


def _check_ids(response_mask, input_ids, mask_token_id):
    if input_ids is None:
        if mask_token_id is not None:
            raise ValueError("sample_masks: mask_token_id= needs input_ids=")
        return
    if input_ids.shape != response_mask.shape or input_ids.dtype.is_floating_point:
        raise ValueError(
            f"sample_masks: input_ids must be an integer tensor [B, L] = {tuple(response_mask.shape)}, "
            f"got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if mask_token_id is None:
        raise ValueError("sample_masks: input_ids= needs mask_token_id=")


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
# One program per sample (b, j) sweeps its row in BLOCK_L chunks. Each position gets a 32-bit Philox
# key from (seed, sample * L + position), so any pass can regenerate the keys instead of storing them.
#
# l-uniform: the masked set is the `count` response positions with the smallest (key, position). The
# count-th smallest key T is found by bisection on its 32 bits (each step counts the keys <= a probe
# over the row); then every key < T is masked, plus the first `count - #(key < T)` positions whose
# key equals T (a running cumsum over the row). The count is therefore exact even with ties, and
# because the keys are i.i.d. uniform the chosen set is uniform over all subsets of that size (up to
# the ~L / 2^32 chance of a tie at the threshold, broken by position).
# t-Bernoulli: a uniform per position from the same stream, masked where it is below the level.

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_keys(seed, base, pos):
        """int64 in [0, 2^32): the Philox key of each position of a sample."""
        return tl.randint(seed, base + pos).to(tl.int64)

    @triton.jit
    def _kth_smallest_key(key, count):
        """The count-th smallest of the int64 keys [BLOCK] (all < 2^32 that count), by bisection on 32 bits."""
        thr = count * 0
        step = thr + 2147483648
        for _ in range(32):
            probe = thr + step - 1
            thr = tl.where(tl.sum((key <= probe).to(tl.int64), axis=0) >= count, thr, thr + step)
            step = step // 2
        return thr

    @triton.jit
    def _take_smallest(key, ok, thr, ties_left, ties_seen):
        """Positions below the threshold key, plus the first `ties_left` (after `ties_seen` earlier) equal to it."""
        tie = ok & (key == thr)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int64), axis=0)
        return ok & ((key < thr) | (tie & (tie_rank <= ties_left)))

    @triton.jit
    def _store_row(hit, pos, in_row, out_row, row, L, ids_ptr, masked_ptr, noisy_ptr, mask_token_id,
                   WRITE_IDS: tl.constexpr):
        tl.store(masked_ptr + out_row + pos, hit.to(tl.int8), mask=in_row)
        if WRITE_IDS:
            ids = tl.load(ids_ptr + row.to(tl.int64) * L + pos, mask=in_row, other=0)
            tl.store(noisy_ptr + out_row + pos, tl.where(hit, mask_token_id, ids), mask=in_row)

    @triton.jit
    def _sample_masks_kernel(resp_ptr, level_ptr, ids_ptr, masked_ptr, noisy_ptr, seed, L, n_samples,
                             mask_token_id, EXACT: tl.constexpr, WRITE_IDS: tl.constexpr,
                             ONE_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        s = tl.program_id(0)
        row = s // n_samples
        resp_row = resp_ptr + row.to(tl.int64) * L
        base = s.to(tl.int64) * L
        out_row = s.to(tl.int64) * L
        if EXACT:
            count = tl.load(level_ptr + s).to(tl.int64)
            if ONE_CHUNK:
                # The whole row fits one block: generate the keys once and search in registers.
                pos = tl.arange(0, BLOCK_L)
                in_row = pos < L
                ok = tl.load(resp_row + pos, mask=in_row, other=0) != 0
                key = tl.where(ok, _row_keys(seed, base, pos), 1 << 32)  # excluded: above every probe
                thr = _kth_smallest_key(key, count)
                hit = _take_smallest(key, ok, thr, count - tl.sum((key < thr).to(tl.int64), axis=0), count * 0)
                _store_row(hit, pos, in_row, out_row, row, L, ids_ptr, masked_ptr, noisy_ptr, mask_token_id, WRITE_IDS)
            else:
                # Bisection for T = the count-th smallest key among the response positions:
                # the invariant is T in [thr, thr + 2 * step - 1].
                thr = count * 0
                step = thr + 2147483648
                for _ in range(32):
                    probe = thr + step - 1
                    hits = tl.zeros((BLOCK_L,), dtype=tl.int32)
                    for l0 in range(0, L, BLOCK_L):
                        pos = l0 + tl.arange(0, BLOCK_L)
                        ok = tl.load(resp_row + pos, mask=pos < L, other=0) != 0
                        hits += (ok & (_row_keys(seed, base, pos) <= probe)).to(tl.int32)
                    thr = tl.where(tl.sum(hits, axis=0) >= count, thr, thr + step)
                    step = step // 2
                below = tl.zeros((BLOCK_L,), dtype=tl.int32)
                for l0 in range(0, L, BLOCK_L):
                    pos = l0 + tl.arange(0, BLOCK_L)
                    ok = tl.load(resp_row + pos, mask=pos < L, other=0) != 0
                    below += (ok & (_row_keys(seed, base, pos) < thr)).to(tl.int32)
                ties_left = count - tl.sum(below, axis=0)
                ties_seen = count * 0
                for l0 in range(0, L, BLOCK_L):
                    pos = l0 + tl.arange(0, BLOCK_L)
                    in_row = pos < L
                    ok = tl.load(resp_row + pos, mask=in_row, other=0) != 0
                    key = _row_keys(seed, base, pos)
                    hit = _take_smallest(key, ok, thr, ties_left, ties_seen)
                    ties_seen += tl.sum((ok & (key == thr)).to(tl.int64), axis=0)
                    _store_row(hit, pos, in_row, out_row, row, L, ids_ptr, masked_ptr, noisy_ptr, mask_token_id,
                               WRITE_IDS)
        else:
            p = tl.load(level_ptr + s).to(tl.float32)
            for l0 in range(0, L, BLOCK_L):
                pos = l0 + tl.arange(0, BLOCK_L)
                in_row = pos < L
                ok = tl.load(resp_row + pos, mask=in_row, other=0) != 0
                hit = ok & (tl.rand(seed, base + pos) < p)
                _store_row(hit, pos, in_row, out_row, row, L, ids_ptr, masked_ptr, noisy_ptr, mask_token_id, WRITE_IDS)


# On a GPU a 1024-position chunk covers most responses in one pass; in the interpreter a small chunk
# keeps the tests' rows spanning several chunks.
_GPU_CONFIG = dict(BLOCK_L=1024, num_warps=4, num_stages=2)
_INTERPRETER_CONFIG = dict(BLOCK_L=64, num_warps=4, num_stages=1)


def philox_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A 62-bit Philox seed drawn from ``generator`` (the global RNG of ``device`` when None)."""
    gen_device = generator.device if generator is not None else device
    return int(torch.randint(2**62, (1,), generator=generator, device=gen_device).item())


def sample_masks_triton(response_mask, counts=None, probs=None, generator=None, input_ids=None, mask_token_id=None):
    """Triton mask sampler: bool [B, n, L] (and the noisy ids [B, n, L] when ``input_ids`` is given)."""
    level = _check_inputs(response_mask, counts, probs)
    B, L = response_mask.shape
    n = level.shape[1]
    dev = response_mask.device
    seed = philox_seed(generator, dev)
    masked = torch.empty((B, n, L), dtype=torch.int8, device=dev)
    noisy = torch.empty((B, n, L), dtype=torch.int64, device=dev) if input_ids is not None else None
    if B * n * L:
        cfg = _GPU_CONFIG if dev.type == "cuda" else _INTERPRETER_CONFIG
        level_arg = counts.long().contiguous() if counts is not None else probs.float().contiguous()
        ids_arg = input_ids.long().contiguous() if input_ids is not None else masked
        _sample_masks_kernel[(B * n,)](
            response_mask.contiguous().view(torch.int8), level_arg, ids_arg, masked,
            noisy if noisy is not None else masked, seed, L, n, int(mask_token_id or 0),
            EXACT=counts is not None, WRITE_IDS=input_ids is not None, ONE_CHUNK=L <= cfg["BLOCK_L"], **cfg,
        )
    masked = masked.view(torch.bool)
    return masked if noisy is None else (masked, noisy)


def sample_masks(
    response_mask: torch.Tensor,
    counts: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    impl: str = "auto",
    input_ids: torch.Tensor | None = None,
    mask_token_id: int | None = None,
):
    """Draw masks over the response positions.

    Args:
        response_mask: bool [B, L]; True on the positions that may be masked.
        counts: int [B, n]; mask exactly this many response positions (0 <= count <= L_b).
        probs: float [B, n]; mask each response position independently with this probability.
        generator: source of randomness (the Triton path draws its Philox seed from it).
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`vrpo_kernels.dispatch`).
        input_ids: optional int [B, L]; also return the noisy inputs (masked positions replaced).
        mask_token_id: the id written at masked positions (with ``input_ids``).

    Returns:
        bool [B, n, L], never True outside ``response_mask``; with ``input_ids`` a pair
        ``(masked, noisy_ids)`` where ``noisy_ids`` is int64 [B, n, L].
    """
    impl = resolve_impl(impl, response_mask, "sample_masks", ("auto", "torch", "triton"))
    _check_ids(response_mask, input_ids, mask_token_id)
    if impl == "triton":
        return sample_masks_triton(response_mask, counts, probs, generator, input_ids, mask_token_id)
    masked = sample_masks_torch(response_mask, counts, probs, generator)
    if input_ids is None:
        return masked
    return masked, torch.where(masked, torch.as_tensor(mask_token_id, device=masked.device), input_ids[:, None, :].long())


def aot_specs() -> list[dict]:
    """The mask kernel's GPU configurations: l-uniform / t-Bernoulli, rows of one chunk or several,
    with and without the noisy ids."""
    if not triton_available():
        return []
    specs = []
    for exact in (True, False):
        for one_chunk in (True, False):
            for write_ids in (False, True):
                sig = {
                    "resp_ptr": "*i8", "level_ptr": "*i64" if exact else "*fp32", "ids_ptr": "*i64",
                    "masked_ptr": "*i8", "noisy_ptr": "*i64", "seed": "i64", "L": "i32", "n_samples": "i32",
                    "mask_token_id": "i32", "EXACT": "constexpr", "WRITE_IDS": "constexpr",
                    "ONE_CHUNK": "constexpr", "BLOCK_L": "constexpr",
                }
                attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
                name = (f"mask_sampling[{'l_uniform' if exact else 't_bernoulli'},"
                        f"{'one_chunk' if one_chunk else 'chunked'},ids={int(write_ids)}]")
                specs.append(dict(
                    name=name, fn=_sample_masks_kernel, signature=sig,
                    constexprs={"EXACT": exact, "WRITE_IDS": write_ids, "ONE_CHUNK": one_chunk,
                                "BLOCK_L": _GPU_CONFIG["BLOCK_L"]},
                    attrs=attrs, num_warps=_GPU_CONFIG["num_warps"], num_stages=_GPU_CONFIG["num_stages"],
                ))
    return specs
