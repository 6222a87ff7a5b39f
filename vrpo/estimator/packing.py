"""Packed rows: several samples in one row, attention blocked across them.

A packed batch is described by ``segment_ids``, int [B, S]: adjacent tokens with the same non-negative id
belong to the same sample; a negative id marks padding. Each sample gets its own RoPE positions (restarting
at 0) and attends only to itself; padding is attended to by no one.

The model (:class:`~vrpo.models.modeling.BidirectionalLlamaModel`) takes ``segment_ids=`` directly and turns
it into what its attention backend honours; :func:`packing_kwargs` builds the keyword arguments for
``model(input_ids, **kwargs)``. All of them are per-row ``[B, ...]`` tensors, so they can be repeated along
dim 0 (as :func:`vrpo.estimator.elbo.elbo_terms` does for its ``n`` samples).
"""

from __future__ import annotations

import torch

BACKENDS = ("sdpa", "eager", "flash_attention_2", "vrpo_triton")


def _check_segments(segment_ids: torch.Tensor, name: str = "segment_ids") -> torch.Tensor:
    if not torch.is_tensor(segment_ids) or segment_ids.dim() != 2:
        got = tuple(segment_ids.shape) if torch.is_tensor(segment_ids) else type(segment_ids).__name__
        raise ValueError(f"{name} must be an integer tensor [B, S], got {got}")
    if segment_ids.is_floating_point() or segment_ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.dtype == torch.bool:
        segment_ids = segment_ids.long()
    return segment_ids


def _run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: True where a new run of equal ids begins (always at column 0)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def canonical_segments(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, S]: one id per run of equal ids (0, 1, 2, ... per row), -1 on padding.

    Runs, not values, define samples, so two samples that reuse an id elsewhere in the row stay apart.
    ``attention_mask`` [B, S] (1 = token, 0 = padding), when given, marks extra padding.
    """
    segment_ids = _check_segments(segment_ids)
    if attention_mask is not None:
        if attention_mask.shape != segment_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match segment_ids "
                f"{tuple(segment_ids.shape)} (a 2D padding mask; do not combine segment_ids with a 4D mask)"
            )
        segment_ids = torch.where(attention_mask.bool(), segment_ids, -1)
    pad = segment_ids < 0
    runs = _run_starts(segment_ids).long().cumsum(1) - 1
    return torch.where(pad, -1, runs)


def segment_positions(segment_ids: torch.Tensor) -> torch.LongTensor:
    """int64 [B, S]: each token's position within its run of equal ids (RoPE positions restart per sample)."""
    segment_ids = _check_segments(segment_ids)
    S = segment_ids.shape[1]
    idx = torch.arange(S, device=segment_ids.device).expand_as(segment_ids)
    run_start = torch.where(_run_starts(segment_ids), idx, 0).cummax(dim=1).values
    return idx - run_start


def block_diagonal_mask(segment_ids: torch.Tensor, attn_implementation: str = "sdpa", dtype=torch.float32):
    """The 4D mask [B, 1, S, S] that sdpa or eager attention honours for packed rows.

    ``"sdpa"``: bool, True where query i may attend to key j. ``"eager"``: additive, 0 where allowed and the
    most negative ``dtype`` value elsewhere. A padding query may attend only to itself, which keeps its
    softmax finite (a NaN there would leak into every row through ``0 * NaN``); no real token sees it.
    """
    seg = canonical_segments(segment_ids)
    valid = seg >= 0
    allowed = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None]
    eye = torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)
    allowed = (allowed | (~valid[:, :, None] & eye))[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=seg.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ValueError(f"block_diagonal_mask: attn_implementation={attn_implementation!r} is not 'sdpa' or 'eager'")


def flash_varlen_kwargs(segment_ids: torch.Tensor) -> dict:
    """``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` for flash-attn's varlen path (flattened batch).

    Every run of equal ids in every row is one sequence; a padding run is a sequence of its own (it attends
    only to padding, and no real token attends to it).
    """
    seg = _check_segments(segment_ids)
    B, S = seg.shape
    starts = _run_starts(seg).flatten().nonzero()[:, 0]
    total = torch.tensor([B * S], device=seg.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packing_kwargs(segment_ids: torch.Tensor, attn_implementation: str | None = None, *, dtype=torch.float32) -> dict:
    """Keyword arguments for ``model(input_ids, **kwargs)`` on packed rows ([B, ...] tensors only).

    Args:
        segment_ids: int [B, S]; adjacent tokens with equal ids form one sample, negative ids are padding.
        attn_implementation: ``None`` (or ``"vrpo_triton"``/``"flash_attention_2"``) gives
            ``{"segment_ids", "position_ids"}``, which a model from :func:`vrpo.models.load_llada` turns
            into what its backend needs. ``"sdpa"`` or ``"eager"`` gives ``{"attention_mask",
            "position_ids"}`` with the 4D block-diagonal mask materialised (bool for sdpa, additive
            ``dtype`` for eager), which any bidirectional transformers Llama honours.
        dtype: the additive mask's dtype for ``"eager"``.

    ``position_ids`` restart at 0 for each sample, as if it ran alone.
    """
    seg = canonical_segments(segment_ids)
    positions = segment_positions(seg)
    if attn_implementation in (None, "vrpo_triton", "flash_attention_2"):
        return {"segment_ids": seg, "position_ids": positions}
    if attn_implementation in ("sdpa", "eager"):
        return {
            "attention_mask": block_diagonal_mask(seg, attn_implementation, dtype),
            "position_ids": positions,
        }
    raise ValueError(f"packing_kwargs: attn_implementation={attn_implementation!r} is not one of {(None, *BACKENDS)}")


def pack_rows(sequences: list[torch.Tensor], row_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack 1D token tensors greedily (first fit, in order) into rows of ``row_length``.

    Returns ``input_ids`` int64 [R, row_length] (padded with ``pad_id``) and ``segment_ids`` int64
    [R, row_length] (the index of the sequence in ``sequences``, -1 on padding).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, seq in enumerate(sequences):
        n = int(seq.numel())
        if n > row_length:
            raise ValueError(f"pack_rows: sequence {i} has {n} tokens, more than row_length={row_length}")
        for r, left in enumerate(room):
            if left >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_length - n)
    ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), row_length), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = int(sequences[i].numel())
            ids[r, col : col + n] = sequences[i]
            seg[r, col : col + n] = i
            col += n
    return ids, seg


def backend_inputs(
    attn_implementation: str,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """What ``attn_implementation`` needs for packed rows, as keyword arguments for a transformers Llama body.

    ``segment_ids`` int [B, S] (negative = padding) and an optional 2D padding ``attention_mask`` [B, S]
    become:
    sdpa/eager: a 4D block-diagonal ``attention_mask``; vrpo_triton: ``segment_ids`` (no [S, S] mask);
    flash_attention_2: flash-attn varlen ``cu_seq_lens_*``/``max_length_*`` over the flattened batch.
    ``position_ids`` restart per sample unless given.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"segment_ids cannot be combined with a {attention_mask.dim()}D attention_mask; "
            "pass segment_ids alone (with an optional 2D padding mask)"
        )
    seg = canonical_segments(segment_ids, attention_mask)
    out = {
        "position_ids": segment_positions(seg) if position_ids is None else position_ids,
        "attention_mask": None,
    }
    if attn_implementation in ("sdpa", "eager"):
        out["attention_mask"] = block_diagonal_mask(seg, attn_implementation, dtype)
    elif attn_implementation == "vrpo_triton":
        out["segment_ids"] = seg
    elif attn_implementation == "flash_attention_2":
        out.update(flash_varlen_kwargs(seg))
    else:
        raise ValueError(f"segment_ids: attn_implementation={attn_implementation!r} is not one of {BACKENDS}")
    return out
