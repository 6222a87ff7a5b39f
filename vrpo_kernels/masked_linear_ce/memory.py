"""What a training call of ``masked_linear_ce(impl="triton")`` holds, in bytes: the planner's figure.

:func:`working_set_bytes` counts every tensor the op allocates that is alive at its peak (the end of
the backward), beyond its inputs: what the forward saves (the gathered rows, their log-sum-exp, casts
of the head under autocast), the backward's fp32 logits buffer (at most ``max_buffer_bytes``, or
``512 n`` bytes when even 128 vocabulary columns of ``n`` rows exceed it), the fp32 ``d_hidden``
accumulator of a multi-chunk backward (``4 n H``: the vocabulary is chunked, so ``d_weight`` is
written once per chunk and never accumulated), the GEMM strategy's scratch, and the gradients in the
compute dtype. Rows, the per-row statistics and the output are counted too (``O(N + n + V)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gemm
from .common import DEFAULT_MAX_BUFFER_BYTES, ELEMENT_BYTES
from .triton_path import grad_chunk_cols, vocab_chunks


@dataclass(frozen=True)
class WorkingSet:
    """Bytes by part. The peak (``total``) is at one of two moments: the end of the op's backward
    (``saved + buffer + accumulators + grads``) or, after it, while autograd casts the gradients back
    to the inputs' dtypes and scatters ``d_hidden`` into ``[N, H]`` (``grads + after``)."""

    saved: int  # the forward's: gathered rows in the compute dtype, casts of the head, lse, indices
    buffer: int  # the backward's fp32 logits buffer
    accumulators: int  # fp32 d_hidden (several chunks) and d_bias, GEMM scratch, per-row gradients
    grads: int  # d_hidden [n, H], d_weight, d_bias in the compute dtype
    after: int  # d_weight (and d_bias) cast to the head's own dtype (autocast), d_hidden scattered to [N, H]
    small: int  # outputs [N], per-row and per-split statistics
    param_grads: int  # the bytes that become weight.grad / bias.grad (in the head's own dtype)
    cast_grads: bool  # True: param_grads are made after the op (part of ``after``); else they are in ``grads``

    @property
    def total(self) -> int:
        during = self.saved + self.buffer + self.accumulators + self.grads
        return max(during, self.grads + self.after) + self.small

    @property
    def transient(self) -> int:
        """The peak without the head's parameter gradients in its own dtype (``weight.grad``,
        ``bias.grad``), which a planner counts with the other gradients: what the op adds on top."""
        during = self.saved + self.buffer + self.accumulators + self.grads
        if not self.cast_grads:
            during -= self.param_grads
        return max(during, self.grads + self.after - self.param_grads) + self.small


def working_set_bytes(
    n_rows: int,
    n_selected: int,
    hidden: int,
    vocab: int,
    dtype: torch.dtype,
    *,
    weight_dtype: torch.dtype | None = None,
    hidden_dtype: torch.dtype | None = None,
    bias: bool = False,
    weight_grad: bool = True,
    max_buffer_bytes: int | None = None,
    strategy: gemm.GemmStrategy | None = None,
    splits: int = 1,
) -> WorkingSet:
    """Peak bytes of one forward + backward of ``masked_linear_ce(impl="triton")`` with gradients for
    hidden, weight (and bias), beyond its inputs.

    n_rows: N, the rows of ``hidden``; n_selected: rows the mask selects; hidden: H; vocab: V; dtype:
    the compute dtype (the weight's, or the autocast dtype); weight_dtype: the head's own dtype
    (default ``dtype``; fp32 under autocast adds its cast); hidden_dtype: the hidden states' own dtype
    (default ``dtype``); weight_grad: False for a frozen head (LoRA: no d_weight, d_bias); strategy: the backward's
    GEMM forms (default
    the forms every torch has, "upcast" and "scratch16_add"); splits: the forward's vocabulary splits
    (:func:`vrpo_kernels.masked_linear_ce.triton_path.gpu_vocab_split` gives them for a GPU).
    """
    n, H, V, N = n_selected, hidden, vocab, n_rows
    es = ELEMENT_BYTES[dtype]
    weight_dtype = weight_dtype or dtype
    budget = DEFAULT_MAX_BUFFER_BYTES if max_buffer_bytes is None else max_buffer_bytes
    cols = grad_chunk_cols(n, V, budget)
    chunks = len(vocab_chunks(V, cols))
    casts = (V * H * es + (V * es if bias else 0)) if weight_dtype != dtype else 0
    saved = n * H * es + casts + 4 * n + 8 * n + 8 * n  # h, weight/bias casts, lse, targets, row index
    buffer = 4 * n * min(cols, V)
    accumulators = 4 * n  # the incoming gradient as fp32
    if bias and weight_grad:
        accumulators += 4 * V + 4 * cols  # fp32 d_bias and one chunk's column sum
    if chunks > 1 and dtype != torch.float32:
        strategy = strategy or gemm.GemmStrategy("upcast", "scratch16_add")
        accumulators += 4 * n * H + max(  # d_hidden's accumulation, or the logits product's scratch
            gemm.scratch_bytes(strategy, n, cols, H, dtype, accumulating=True),
            gemm.scratch_bytes(strategy, n, H, cols, dtype, accumulating=False),
        )
    elif chunks > 1:
        accumulators += 4 * n * H
    eh = ELEMENT_BYTES[hidden_dtype or dtype]
    head_grads = (V * H * es + (V * es if bias else 0)) if weight_grad else 0
    grads = n * H * es + head_grads
    master = (V * H + (V if bias else 0)) * ELEMENT_BYTES[weight_dtype] if weight_dtype != dtype and weight_grad else 0
    # d_hidden back to the hidden's dtype (when it differs), then scattered: new_zeros + index_put.
    after = master + (n * H * eh if eh != es or (hidden_dtype or dtype) != dtype else 0) + 2 * N * H * eh
    small = 4 * N * 3 + 4 * 3 * splits * n
    return WorkingSet(
        saved, buffer, accumulators, grads, after, small, param_grads=master or head_grads, cast_grads=master > 0
    )
