"""The ``"triton"`` path: launchers, the autograd Function, and the AOT specs (``python -m tools.aot_report``)."""

from __future__ import annotations

import functools
import itertools

import torch

from .._triton_utils import aot_spec, on_device, upcast_dots
from ..dispatch import cuda_rules, triton_available

if triton_available():
    import triton

    from .kernels import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd
else:  # pragma: no cover - platforms without triton wheels
    triton = None
from .common import _LOG2E, MAX_TRITON_HEAD_DIM, _default_scale
from .configs import _SM90_CONFIGS, AttentionConfig, _block_d, attention_config
from .segments import _kernel_segments

# --------------------------------------------------------------------------------------------------
# Launchers and the autograd Function
# --------------------------------------------------------------------------------------------------


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_forward(q, k, v, seg, lo, hi, scale, store_lse, config=None):
    """Launch _attn_fwd. Returns (out [B, Hq, S, D] in q's dtype, lse float32 [B, Hq, S] or None).

    ``out`` is a [B, Hq, S, D] view of a contiguous [B, S, Hq, D] buffer: the layout the model's
    output projection reads, so that ``out.transpose(1, 2)`` needs no copy.
    """
    B, H, S, D = q.shape
    cfg = (config or attention_config(D, q.device)).fwd
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device) if store_lse else None
    grid = (triton.cdiv(S, cfg.block_m) * B * H,)
    with on_device(q):
        _launch_fwd(grid, q, k, v, seg, lo, hi, out, lse, scale, cfg)
    return out, lse


def _launch_fwd(grid, q, k, v, seg, lo, hi, out, lse, scale, cfg):
    B, H, S, D = q.shape
    store_lse = lse is not None
    _attn_fwd[grid](
        q,
        k,
        v,
        seg,
        lo,
        hi,
        out,
        lse if store_lse else out.new_empty(0, dtype=torch.float32),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        S,
        H,
        H // k.shape[1],
        scale * _LOG2E,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        STORE_LSE=store_lse,
        UPCAST_DOT=upcast_dots(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _flash_backward(do, q, k, v, out, lse, seg, lo, hi, scale, config=None, need_dq=True, need_dkdv=True):
    """Launch the backward kernels: delta, then dK/dV and dQ (each only if needed).

    Returns dq, dk, dv in the inputs' dtypes and memory layouts (a transposed [B, S, H, D] input gets
    a gradient in that layout, so the projection's backward reads it without a copy), None where not
    needed.
    """
    with on_device(q):
        return _launch_backward(do, q, k, v, out, lse, seg, lo, hi, scale, config, need_dq, need_dkdv)


def _launch_backward(do, q, k, v, out, lse, seg, lo, hi, scale, config, need_dq, need_dkdv):
    B, H, S, D = q.shape
    cfgs = config or attention_config(D, q.device)

    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    c = cfgs.delta
    _attn_bwd_delta[(triton.cdiv(S, c.block_m) * B * H,)](
        out,
        do,
        delta,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        S,
        H,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=c.block_m,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )

    dq = dk = dv = None
    if need_dkdv:
        dk, dv = _launch_dkdv(q, k, v, do, lse, delta, seg, lo, hi, scale, cfgs.dkdv)
    if need_dq:
        dq = _launch_dq(q, k, v, do, lse, delta, seg, lo, hi, scale, cfgs.dq)
    return dq, dk, dv


def _launch_dkdv(q, k, v, do, lse, delta, seg, lo, hi, scale, c):
    B, H, S, D = q.shape
    group = H // k.shape[1]
    dk = torch.empty_like(k)
    dv = torch.empty_like(dk)  # the kernel writes both with dk's strides
    _attn_bwd_dkdv[(triton.cdiv(S, c.block_n) * B * (H // group),)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        seg,
        lo,
        hi,
        dk,
        dv,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        S,
        H,
        group,
        scale * _LOG2E,
        scale,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        UPCAST_DOT=upcast_dots(q.dtype),
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return dk, dv


def _launch_dq(q, k, v, do, lse, delta, seg, lo, hi, scale, c):
    B, H, S, D = q.shape
    dq = torch.empty_like(q)
    _attn_bwd_dq[(triton.cdiv(S, c.block_m) * B * H,)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        seg,
        lo,
        hi,
        dq,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        S,
        H,
        H // k.shape[1],
        scale * _LOG2E,
        scale,
        HEAD_DIM=D,
        BLOCK_D=_block_d(D),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        UPCAST_DOT=upcast_dots(q.dtype),
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return dq


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels. Saves q, k, v, out, the LSE and the segment arrays."""

    @staticmethod
    def forward(ctx, q, k, v, seg, lo, hi, scale, config):
        out, lse = _flash_forward(q, k, v, seg, lo, hi, scale, store_lse=True, config=config)
        ctx.save_for_backward(q, k, v, out, lse, seg, lo, hi)
        ctx.scale = scale
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, seg, lo, hi = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _flash_backward(
            do, q, k, v, out, lse, seg, lo, hi, ctx.scale, ctx.config, need_dq=need_q, need_dkdv=need_k or need_v
        )
        return dq, dk, dv, None, None, None, None, None


def attention_triton(q, k, v, segment_ids=None, scale=None, config: AttentionConfig | None = None):
    """The Triton path (CUDA, or CPU under TRITON_INTERPRET=1). Same shapes as :func:`attention_torch`.

    Without a gradient to compute (``torch.is_grad_enabled()`` false, or no input requiring grad)
    it runs the forward kernel alone: no LSE is stored and no autograd graph is built.
    ``config`` overrides the tile sizes (tests use it to cover other tilings).
    """
    if q.dim() == 4 and q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(
            f"bidirectional_attention: head dim {q.shape[-1]} exceeds {MAX_TRITON_HEAD_DIM}, the largest the "
            "Triton kernels support; use impl='torch'"
        )
    supported = (torch.float16, torch.bfloat16) + (() if cuda_rules(q) else (torch.float32,))
    if q.dtype not in supported:
        raise ValueError(
            f"bidirectional_attention: impl='triton' on {'cuda' if cuda_rules(q) else q.device.type} supports "
            f"{[str(d) for d in supported]}, q is {q.dtype}; use impl='torch'"
        )
    B, H, S, D = q.shape
    scale = _default_scale(scale, D)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.numel() == 0:
        out = q.new_zeros(q.shape)
        return out + 0 * (q.sum() + k.sum() + v.sum()) if needs_grad else out
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    seg, lo, hi = _kernel_segments(segment_ids, B, S, q.device)
    if needs_grad:
        return FlashAttentionFunction.apply(q, k, v, seg, lo, hi, scale, config)
    return _flash_forward(q, k, v, seg, lo, hi, scale, store_lse=False, config=config)[0]


# --------------------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m tools.aot_report)
# --------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _bshd_strides(prefix, n_heads, seq_len, head_dim):
    """Strides of a [B, heads, S, D] view of a contiguous [B, S, heads, D] tensor, as transformers passes
    q/k/v (and as the forward writes its output), named like the kernels' stride arguments."""
    return {
        f"stride_{prefix}b": seq_len * n_heads * head_dim,
        f"stride_{prefix}h": head_dim,
        f"stride_{prefix}s": n_heads * head_dim,
    }


def aot_specs(seq_len=4096, n_heads=32, n_kv_heads=32):
    """Every kernel configuration the Triton path launches on an H100 (sm_90), for AOT inspection.

    For head dims 64 and 128, float16 and bfloat16: the forward kernel with and without the LSE
    (training / reference model), then the delta, dK/dV and dQ kernels of the backward pass.

    Each entry: name, fn (the @triton.jit function), signature (arg -> triton type), constexprs
    (arg -> value), attrs (the 16-divisibility hints the JIT attaches for 16-byte-aligned contiguous
    tensors of this shape; pass them to ASTSource to compile exactly what runs), num_warps,
    num_stages. Scalars are specialised as Triton's JIT specialises the call a transformers model
    makes (q/k/v as [B, heads, seq_len, D] views of [B, seq_len, heads, D]), so that GROUP = 1 (no GQA, as in LLaDA
    8B) becomes a constexpr as
    it does at run time. Compile in a process without TRITON_INTERPRET (the interpreter replaces
    @triton.jit functions), and read registers and spills with triton's own sm_90 ptxas
    (``triton.backends.nvidia.compiler.get_ptxas(90)``: the PTX that triton 3.9 emits is version
    9.x, which the older ``bin/ptxas`` (CUDA 12.9) rejects).
    """
    if triton is None:  # pragma: no cover
        return []
    specs = []
    group = n_heads // n_kv_heads
    for head_dim, dtype in itertools.product((64, 128), (torch.float16, torch.bfloat16)):
        cfgs = _SM90_CONFIGS[head_dim]
        ty = _TRITON_DTYPES[dtype]
        tag = f"d{head_dim}_{ty}"
        q_layout = functools.partial(_bshd_strides, n_heads=n_heads, seq_len=seq_len, head_dim=head_dim)
        kv_layout = functools.partial(_bshd_strides, n_heads=n_kv_heads, seq_len=seq_len, head_dim=head_dim)
        tiles = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "UPCAST_DOT": False}
        sizes = {"S": seq_len, "H": n_heads}

        c = cfgs.fwd
        fwd_ptrs = {
            "Q": ty,
            "K": ty,
            "V": ty,
            "OUT": ty,
            "SEG": "i32",
            "SPAN_LO": "i32",
            "SPAN_HI": "i32",
            "LSE": "fp32",
        }
        fwd_scalars = {
            **q_layout("q"),
            **kv_layout("k"),
            **kv_layout("v"),
            **q_layout("o"),
            **sizes,
            "GROUP": group,
            "qk_scale": 1.0,
        }
        for store_lse in (True, False):
            specs.append(
                aot_spec(
                    f"attn_fwd_{'lse' if store_lse else 'nolse'}_{tag}",
                    _attn_fwd,
                    fwd_ptrs,
                    fwd_scalars,
                    {**tiles, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "STORE_LSE": store_lse},
                    c.num_warps,
                    c.num_stages,
                )
            )

        c = cfgs.delta
        delta_tiles = {k: v for k, v in tiles.items() if k != "UPCAST_DOT"}
        specs.append(
            aot_spec(
                f"attn_bwd_delta_{tag}",
                _attn_bwd_delta,
                {"OUT": ty, "DO": ty, "DELTA": "fp32"},
                {**q_layout("o"), **q_layout("do"), **sizes},
                {**delta_tiles, "BLOCK_M": c.block_m},
                c.num_warps,
                c.num_stages,
            )
        )

        # The gradients come back in the inputs' layouts (empty_like), dO in the output's.
        bwd_ptrs = {
            "Q": ty,
            "K": ty,
            "V": ty,
            "DO": ty,
            "LSE": "fp32",
            "DELTA": "fp32",
            "SEG": "i32",
            "SPAN_LO": "i32",
            "SPAN_HI": "i32",
            "DK": ty,
            "DV": ty,
            "DQ": ty,
        }
        bwd_scalars = {
            **q_layout("q"),
            **kv_layout("k"),
            **kv_layout("v"),
            **q_layout("do"),
            **kv_layout("dk"),
            **q_layout("dq"),
            **sizes,
            "GROUP": group,
            "qk_scale": 1.0,
            "scale": 1.0,
        }
        for kname, fn, c in (("dkdv", _attn_bwd_dkdv, cfgs.dkdv), ("dq", _attn_bwd_dq, cfgs.dq)):
            specs.append(
                aot_spec(
                    f"attn_bwd_{kname}_{tag}",
                    fn,
                    bwd_ptrs,
                    bwd_scalars,
                    {**tiles, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                    c.num_warps,
                    c.num_stages,
                )
            )
    return specs
