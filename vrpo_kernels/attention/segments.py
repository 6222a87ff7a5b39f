"""Segment spans: which keys a block of queries (or queries a block of keys) can possibly see."""

from __future__ import annotations

import functools
import weakref

import torch

# --------------------------------------------------------------------------------------------------
# Segment spans: which keys a block of queries (or queries a block of keys) can possibly see
# --------------------------------------------------------------------------------------------------


def segment_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' view of ``segment_ids`` [B, S]: (seg, lo, hi), int32 [B, S] each.

    seg: the rank of each token's id among the distinct non-negative ids of its row, or -1 for
    padding (any width of integer id fits in int32 this way). lo, hi: the first position and one past
    the last position of the token's id in its row; padding gets lo = S and hi = 0, neutral for the
    min/max the kernels take over a block.

    Works for non-contiguous ids too (the span then covers every occurrence). Sort-based, with no
    host synchronisation, so it is cheap on the GPU: O(S log S) per row against O(S^2 D) attention.
    """
    B, S = segment_ids.shape
    device = segment_ids.device
    ids, perm = torch.sort(segment_ids, dim=1, stable=True)
    idx = torch.arange(S, device=device).expand(B, S)
    starts = torch.ones(B, S, dtype=torch.bool, device=device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    group_first = torch.where(starts, idx, 0).cummax(dim=1).values
    group_last = torch.where(ends, idx, S - 1).flip(1).cummin(dim=1).values.flip(1)
    # A stable sort keeps the positions of one id in increasing order, so the first and last
    # element of each group in `perm` are the first and last occurrence of that id.
    lo = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, group_first))
    hi = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, group_last) + 1)
    rank = torch.empty_like(perm).scatter_(1, perm, starts.long().cumsum(dim=1))
    pad = segment_ids < 0
    seg = rank.masked_fill(pad, -1).to(torch.int32)
    lo = lo.masked_fill(pad, S).to(torch.int32)
    hi = hi.masked_fill(pad, 0).to(torch.int32)
    return seg, lo, hi


class LastCallCache:
    """``fn`` of tensors (or None), remembering its result for the last arguments.

    Every layer of a model passes the same mask tensors, so a layout derived from them is computed
    once per forward, not once per layer. The arguments are held weakly and keyed with their version
    counters, so an in-place change is noticed; inference tensors have no version counter and are
    never cached.
    """

    def __init__(self, fn):
        self.fn = fn
        self._key: tuple = ()
        self._value = None
        functools.update_wrapper(self, fn)

    def _hit(self, tensors) -> bool:
        if len(self._key) != len(tensors):
            return False
        for entry, t in zip(self._key, tensors):
            if (entry is None) != (t is None):
                return False
            if t is not None and (entry[0]() is not t or entry[1] != t._version):
                return False
        return True

    def __call__(self, *tensors):
        if any(t is not None and t.is_inference() for t in tensors):
            return self.fn(*tensors)
        if not self._hit(tensors):
            self._value = self.fn(*tensors)
            self._key = tuple(None if t is None else (weakref.ref(t), t._version) for t in tensors)
        return self._value


_cached_segment_layout = LastCallCache(segment_layout)


def _kernel_segments(segment_ids, B, S, device):
    """(seg, lo, hi) for the kernels; None means one segment per row."""
    if segment_ids is None:
        seg = torch.zeros(B, S, dtype=torch.int32, device=device)
        lo = torch.zeros(B, S, dtype=torch.int32, device=device)
        hi = torch.full((B, S), S, dtype=torch.int32, device=device)
        return seg, lo, hi
    return _cached_segment_layout(segment_ids)
