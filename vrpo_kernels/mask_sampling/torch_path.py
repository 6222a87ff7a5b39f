"""The ``"torch"`` paths: the generator-seeded mask sampler and the keyed draw."""

from __future__ import annotations

import torch

from .common import _TAG_LEVEL, _TAG_POSITION, _U32, KeyedDraw, _check_inputs, _floor_words
from .philox import philox4x32_words


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


def _key_words(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k0, k1): the low and high 32-bit words of int64 keys (all 64 bits, as Triton's uint64 cast)."""
    return keys & _U32, (keys >> 32) & _U32


def _uniform_below(x0: torch.Tensor, x1: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``floor((x1 * 2^32 + x0) * m / 2^64)`` exactly, for words x0, x1 and 1 <= m < 2^31: int64 in [0, m)."""
    return (x1 * m + ((x0 * m) >> 32)) >> 32


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
