"""Deliberately broken Triton helpers for ``python -m benchmarks.gpu_check --dry-run --plant``: imported
only by a planted run (never by the kernels), so that the check is shown to catch the bug."""

from __future__ import annotations

import triton
import triton.language as tl

from vrpo_kernels.masked_linear_ce import triton_path

_real_logit_tile = triton_path._logit_tile


@triton.jit
def logit_tile_int32_offsets(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    K,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``triton_path._logit_tile`` with int32 row and column indices: the regression the 64-bit offsets
    check exists for (``rows * stride_h`` wraps once it passes 2^31)."""
    return _real_logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows.to(tl.int32),
        cols.to(tl.int32),
        row_ok,
        col_ok,
        K,
        stride_h,
        stride_w,
        HAS_BIAS,
        BLOCK_M,
        BLOCK_V,
        BLOCK_K,
        DOT_PRECISION,
        UPCAST_DOT,
    )
