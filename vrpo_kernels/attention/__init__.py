"""Bidirectional (non-causal) attention over packed, variable-length rows.

``segment_ids`` [B, S] (int) says which sample each token belongs to: a query attends only to keys
with the same segment id. Tokens with a negative segment id are padding: they attend to nothing,
nobody attends to them, their output is 0 and their gradients are 0. ``segment_ids=None`` means one
sample per row.

Segments are expected to be contiguous runs of a row (packing puts samples side by side), which is
what makes block skipping tight. A row whose ids are not contiguous (``[0, 0, 1, 1, 0]``) is still
computed exactly: every token gets the span from the first to the last occurrence of its id, the
kernels visit the key blocks that cover the spans of their queries, and the mask inside a block is
element-wise. Only the skipping becomes less effective.

Implementations (one entry point, :func:`bidirectional_attention`, with ``impl=``):

* ``"triton"``: flash attention (online softmax, log-sum-exp saved for the backward pass) in the
  kernels below. A query block loops only over the key blocks that overlap the spans of its
  queries' segments, so cross-sample blocks and padding-only blocks cost nothing.
* ``"torch"``: :func:`torch.nn.functional.scaled_dot_product_attention` with the block-diagonal mask.
* ``"eager"``: matmul, masked softmax, matmul; :func:`attention_reference` runs it in float64.

Supported by the Triton path: float16 and bfloat16 on the GPU, and float32 in the interpreter
(``TRITON_INTERPRET=1``, for tests; on the GPU a float32 tl.dot either rounds to tf32 or spills
heavily, so ``impl="auto"`` sends float32 CUDA tensors to ``"torch"``). Head dims up to 128: a head
dim that is not a power of two is padded to the next one (at least 16) inside the kernels; the
tiles are tuned for 64 and 128 (LLaDA 8B) on sm_90, and 16 and 32 use the 64 tiles.

The package: :mod:`.op` holds the entry point, :mod:`.common` the shared checks and constants,
:mod:`.torch_path` and :mod:`.reference` the PyTorch paths, :mod:`.segments` the segment spans,
:mod:`.kernels` the Triton kernels, :mod:`.configs` their tiles, and :mod:`.triton_path` the
launchers, the autograd Function and the AOT specs.
"""

from .common import _IMPLS, _LOG2E, MAX_TRITON_HEAD_DIM, _check_inputs, _default_scale, _repeat_kv, segment_mask
from .configs import (
    _GENERIC_CONFIG,
    _INTERPRETER_CONFIG,
    _SM90_CONFIGS,
    AttentionConfig,
    KernelConfig,
    _block_d,
    attention_config,
    sm90_config,
)
from .kernels import triton
from .op import _warn_fallback_once, bidirectional_attention, logger
from .reference import attention_eager, attention_reference
from .segments import LastCallCache, _cached_segment_layout, _kernel_segments, segment_layout
from .torch_path import attention_torch
from .triton_path import (
    _TRITON_DTYPES,
    FlashAttentionFunction,
    _bshd_strides,
    _flash_backward,
    _flash_forward,
    _last_dim_contiguous,
    _launch_backward,
    _launch_dkdv,
    _launch_dq,
    _launch_fwd,
    aot_specs,
    attention_triton,
)

__all__ = [
    "_block_d",
    "_bshd_strides",
    "_cached_segment_layout",
    "_check_inputs",
    "_default_scale",
    "_flash_backward",
    "_flash_forward",
    "_GENERIC_CONFIG",
    "_IMPLS",
    "_INTERPRETER_CONFIG",
    "_kernel_segments",
    "_last_dim_contiguous",
    "_launch_backward",
    "_launch_dkdv",
    "_launch_dq",
    "_launch_fwd",
    "_LOG2E",
    "_repeat_kv",
    "_SM90_CONFIGS",
    "_TRITON_DTYPES",
    "_warn_fallback_once",
    "aot_specs",
    "attention_config",
    "attention_eager",
    "attention_reference",
    "attention_torch",
    "attention_triton",
    "AttentionConfig",
    "bidirectional_attention",
    "FlashAttentionFunction",
    "KernelConfig",
    "LastCallCache",
    "logger",
    "MAX_TRITON_HEAD_DIM",
    "segment_layout",
    "segment_mask",
    "sm90_config",
]

if triton is not None:
    from .kernels import (
        _attn_bwd_delta,
        _attn_bwd_dkdv,
        _attn_bwd_dq,
        _attn_fwd,
        _grid_position,
        _key_block_scores,
        _load_rows,
        _query_block,
        _store_rows,
    )

    __all__ += [
        "_attn_bwd_delta",
        "_attn_bwd_dkdv",
        "_attn_bwd_dq",
        "_attn_fwd",
        "_grid_position",
        "_key_block_scores",
        "_load_rows",
        "_query_block",
        "_store_rows",
    ]
