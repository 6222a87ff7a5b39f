"""The Triton path of :func:`vrpo_kernels.masked_linear_ce` (``impl="triton"``, CUDA or the interpreter).

Forward: ``_lse_forward_kernel`` (logit tiles in registers, an online log-sum-exp per row, split over
the vocabulary so that the programs fill whole waves of the GPU's SMs). Backward, per chunk of
vocabulary columns, into one reused fp32 buffer ``[n, C]``: the logits GEMM, ``_softmax_grad_kernel``
in place, ``d_weight[chunk] = dz^T h`` (written once, no accumulator), ``d_hidden (+)= dz W[chunk]``
and ``d_bias[chunk]``. Why this schedule, its costs and its precision: docs/masked_linear_ce.md.
"""

from __future__ import annotations

import functools

import torch

from .._triton_utils import aot_spec, on_device, upcast_dots
from ..dispatch import fp32_matmul_precision, triton_available
from ..gpus import GPUS
from . import gemm
from .common import DEFAULT_MAX_BUFFER_BYTES, DTYPE_NAMES, FLOOR

if triton_available():
    import triton
    import triton.language as tl

    from .._triton_utils import dot

    @triton.jit
    def _logit_tile(
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
        """fp32 [BLOCK_M, BLOCK_V] logits of rows x cols (masked rows/cols give garbage, not NaN).
        ``rows`` and ``cols`` are int64, so ``rows * stride_h`` cannot wrap past 2^31 elements."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = dot(a, b, acc, UPCAST_DOT, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _lse_forward_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        t_ptr,
        part_max_ptr,
        part_sum_ptr,
        part_tgt_ptr,
        n,
        V,
        K,
        stride_h,
        stride_w,
        tiles_per_split,
        floor,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """Per (row block, vocabulary split): running max, rescaled sum of exp, and target logit."""
        split = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        # A finite floor, not -inf: a tile whose logits are all -inf (padding columns, a -inf bias)
        # then adds exp(-inf - floor) = 0 instead of exp(-inf - -inf) = NaN.
        run_max = tl.zeros((BLOCK_M,), dtype=tl.float32) + floor
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        v_begin = split * tiles_per_split * BLOCK_V
        for t in range(tiles_per_split):
            cols = v_begin + t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logit_tile(
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
                HAS_BIAS,
                BLOCK_M,
                BLOCK_V,
                BLOCK_K,
                DOT_PRECISION,
                UPCAST_DOT,
            )
            z = tl.where(col_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
            tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        out = split * n + rows
        tl.store(part_max_ptr + out, run_max, mask=row_ok)
        tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
        tl.store(part_tgt_ptr + out, tgt_logit, mask=row_ok)

    @triton.jit
    def _softmax_grad_kernel(
        z_ptr,
        dz_ptr,
        b_ptr,
        t_ptr,
        lse_ptr,
        g_ptr,
        C,
        v0,
        stride_z,
        stride_dz,
        HAS_BIAS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One row per program: ``dz = g * (onehot - exp(z + b - lse))`` over the chunk's C logits
        (vocabulary columns [v0, v0 + C); ``b_ptr`` points at the chunk's bias), left to right.

        ``dz`` may be ``z``'s own storage viewed in a 16-bit dtype (same row start, row stride 2C): the
        store of tile [c0, c0 + BLOCK_V) then overwrites the bytes of fp32 logits [c0/2, c0/2 + BLOCK_V/2),
        which this program has already loaded (this tile or earlier ones), never one it loads later. The
        barrier makes every warp's loads of the tile complete before any warp stores it (PTX bar.sync
        orders the CTA's memory accesses); with num_stages=1 no load is issued early.
        """
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(t_ptr + row) - v0
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        for c0 in range(0, C, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            ok = cols < C
            z = tl.load(z_ptr + row * stride_z + cols, mask=ok, other=float("-inf"))
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            dz = g * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp(z - lse))
            tl.debug_barrier()
            tl.store(dz_ptr + row * stride_dz + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# Block sizes per (kernel, dtype) on a GPU. The forward's fp32 configuration runs TF32 or IEEE dots
# (dot_precision); its tiles are smaller because fp32 operands take twice the registers and shared
# memory. The softmax-gradient pass is bandwidth-bound: one row per program, 2048-wide tiles, 8 fp32
# values per thread. Every entry compiles for sm_90 with 0 spills (python -m tools.aot_report).
# Occupancy (tools.aot_report, triton 3.9, sm_90): the 16-bit forward takes up to 186 registers at 8
# warps, 186 x 256 threads > 32K, so one block per SM (FORWARD_BLOCKS_PER_SM, which sizes the waves);
# the fp32 one up to 208 (IEEE dots; 128 with TF32) at 4 warps: two blocks. One block per SM is
# acceptable because the tile loop is a GEMM mainloop whose load latency the 3-stage pipeline hides
# within the block (as in CUTLASS/FlashAttention kernels at one block per SM).
_GPU_CONFIGS = {
    ("forward", "fp16"): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("forward", "bf16"): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ("forward", "fp32"): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("softmax_grad", "fp16"): dict(BLOCK_V=2048, num_warps=8, num_stages=1),
    ("softmax_grad", "bf16"): dict(BLOCK_V=2048, num_warps=8, num_stages=1),
    ("softmax_grad", "fp32"): dict(BLOCK_V=2048, num_warps=8, num_stages=1),
}
# Resident forward blocks per SM, from the sm_90 register report above (65,536 registers per SM).
FORWARD_BLOCKS_PER_SM = {"fp16": 1, "bf16": 1, "fp32": 2}
# Under TRITON_INTERPRET=1 every program is simulated with numpy: few, large blocks are fastest. The
# vocab tile stays small enough that the tests' V spans several tiles and splits.
_INTERPRETER_CONFIGS = {
    "forward": dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "softmax_grad": dict(BLOCK_V=32, num_warps=4, num_stages=1),
}
# The interpreter's "GPU": 4 slots per wave, so that the split logic still runs on tiny shapes.
_INTERPRETER_SLOTS = 4


def _config(kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIGS[kernel])
    return dict(_GPU_CONFIGS[(kernel, DTYPE_NAMES[dtype])])


def dot_precision(dtype: torch.dtype) -> str:
    """The forward's ``tl.dot`` input precision: fp32 operands follow torch's fp32 matmul precision
    (:func:`vrpo_kernels.dispatch.fp32_matmul_precision`: "tf32" when allowed, else "ieee", never TF32
    silently); 16-bit operands are exact in either, "tf32" is Triton's default for them."""
    if dtype != torch.float32:
        return "tf32"
    return fp32_matmul_precision()


def wave_slots(device: torch.device, dtype: torch.dtype) -> int:
    """Forward programs resident at once on ``device``: SMs x blocks per SM (the interpreter: 4)."""
    if device.type != "cuda":
        return _INTERPRETER_SLOTS
    return torch.cuda.get_device_properties(device).multi_processor_count * FORWARD_BLOCKS_PER_SM[DTYPE_NAMES[dtype]]


@functools.lru_cache(maxsize=1024)
def vocab_split(n_row_blocks: int, n_tiles: int, slots: int) -> tuple[int, int]:
    """(splits, tiles per split) of the forward grid (row blocks x splits) that minimises the time in
    units of one tile's work, ``waves * tiles_per_split`` with ``waves = ceil(programs / slots)``: the
    programs fill whole waves of the GPU's ``slots`` (SMs x resident blocks). Ties go to fewer splits
    (fewer partials to merge). Every split is non-empty."""
    best = None
    for per_split in range(1, n_tiles + 1):
        splits = -(-n_tiles // per_split)
        per_split = -(-n_tiles // splits)  # the same grid's shortest split length
        key = (-(-(n_row_blocks * splits) // slots) * per_split, splits)
        if best is None or key < best[0]:
            best = (key, splits, per_split)
    return best[1], best[2]


def gpu_vocab_split(n: int, V: int, dtype: torch.dtype, gpu: str) -> tuple[int, int]:
    """:func:`vocab_split` for ``n`` rows on a GPU of :data:`vrpo_kernels.gpus.GPUS` (no device needed)."""
    cfg = _GPU_CONFIGS[("forward", DTYPE_NAMES[dtype])]
    slots = GPUS[gpu].sms * FORWARD_BLOCKS_PER_SM[DTYPE_NAMES[dtype]]
    return vocab_split(-(-n // cfg["BLOCK_M"]), -(-V // cfg["BLOCK_V"]), slots)


def linear_ce_triton_forward(h, weight, bias, targets):
    """Triton forward on gathered rows (h and weight of one dtype, contiguous). Returns (logp, lse) fp32 [n]."""
    n, K = h.shape
    V = weight.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty.clone()
    cfg = _config("forward", h.dtype, h.device)
    m_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    splits, per_split = vocab_split(m_blocks, triton.cdiv(V, cfg["BLOCK_V"]), wave_slots(h.device, h.dtype))
    part = torch.empty(3, splits, n, dtype=torch.float32, device=h.device)
    precision = dot_precision(h.dtype)
    with on_device(h):
        _lse_forward_kernel[(m_blocks, splits)](
            h,
            weight,
            bias if bias is not None else h,
            targets,
            part[0],
            part[1],
            part[2],
            n,
            V,
            K,
            h.stride(0),
            weight.stride(0),
            per_split,
            FLOOR,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=precision,
            UPCAST_DOT=upcast_dots(h.dtype, precision),
            **cfg,
        )
    run_max, run_sum, tgt = part[0], part[1], part[2]
    top = run_max.amax(dim=0)
    lse = top + (run_sum * torch.exp(run_max - top)).sum(dim=0).log()
    return tgt.sum(dim=0) - lse, lse


# Vocabulary columns per backward chunk are a multiple of this (cuBLAS-friendly leading dimensions).
CHUNK_COL_ALIGN = 128


def grad_chunk_cols(n: int, vocab: int, max_buffer_bytes: int) -> int:
    """Vocabulary columns per backward chunk: the fp32 [n, cols] logits buffer within the budget, cols
    a multiple of CHUNK_COL_ALIGN (at least that, so above ``max_buffer_bytes / (4 * 128)`` rows the
    buffer is ``512 n`` bytes, over the budget), at most ``vocab``."""
    cols = max_buffer_bytes // (4 * max(1, n)) // CHUNK_COL_ALIGN * CHUNK_COL_ALIGN
    return min(vocab, max(CHUNK_COL_ALIGN, cols))


def vocab_chunks(vocab: int, cols: int) -> list[tuple[int, int]]:
    """[v0, v1) of each backward chunk, in order."""
    return [(v0, min(vocab, v0 + cols)) for v0 in range(0, vocab, cols)]


def _softmax_grad(z, dz, bias, targets, lse, g, v0):
    """Launch ``_softmax_grad_kernel`` on one chunk: z fp32 [n, C] -> dz [n, C] (possibly z's storage)."""
    cfg = _config("softmax_grad", dz.dtype, z.device)
    C = z.shape[1]
    with on_device(z):
        _softmax_grad_kernel[(z.shape[0],)](
            z,
            dz,
            bias[v0 : v0 + C] if bias is not None else z,
            targets,
            lse,
            g,
            C,
            v0,
            z.stride(0),
            dz.stride(0),
            HAS_BIAS=bias is not None,
            **cfg,
        )


def _mm(a, b, out, acc_kind: str | None, strategy: gemm.GemmStrategy) -> None:
    """``out = a @ b`` (``acc_kind`` None) or ``out += a @ b``; 16-bit operands into fp32 go through
    the detected strategy, same-dtype products are one plain call every torch has."""
    if out.dtype == a.dtype:
        if acc_kind is None:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif acc_kind is None:
        gemm.product(strategy.product, a, b, out)
    else:
        gemm.accumulate(strategy.accumulate, a, b, out)


def linear_ce_triton_backward(
    grad_logp, h, weight, bias, targets, lse, needs=(True, True, True), max_buffer_bytes=DEFAULT_MAX_BUFFER_BYTES
):
    """Backward of the Triton path; returns (d_h, d_weight, d_bias) in the inputs' dtypes (None where not
    needed). Vocabulary chunks of :func:`grad_chunk_cols` columns, in order; bit-reproducible (no
    atomics, one GEMM per product)."""
    need_h, need_w, need_b = needs
    n, K = h.shape
    V = weight.shape[0]
    if n == 0:
        return (
            torch.zeros_like(h) if need_h else None,
            torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(bias) if need_b else None,
        )
    strategy = gemm.strategy_for(h.device, h.dtype) if h.dtype != torch.float32 else None
    g = grad_logp.float().contiguous()
    cols = grad_chunk_cols(n, V, max_buffer_bytes)
    chunks = vocab_chunks(V, cols)
    buf = torch.empty(n * min(cols, V), dtype=torch.float32, device=h.device)
    # One chunk writes d_hidden directly; several accumulate it in fp32 from zero ([n, H], not [V, H]).
    dh = None
    if need_h:
        dh = torch.empty_like(h) if len(chunks) == 1 else torch.zeros(n, K, dtype=torch.float32, device=h.device)
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty(V, dtype=torch.float32, device=h.device) if need_b else None
    for v0, v1 in chunks:
        w = weight[v0:v1]
        z = buf[: n * (v1 - v0)].view(n, v1 - v0)
        _mm(h, w.T, z, None, strategy)
        dz = z if h.dtype == torch.float32 else z.view(h.dtype)[:, : v1 - v0]
        _softmax_grad(z, dz, bias, targets, lse, g, v0)
        if need_w:
            torch.mm(dz.T, h, out=dw[v0:v1])
        if need_h:
            _mm(dz, w, dh, None if len(chunks) == 1 else "accumulate", strategy)
        if need_b:
            db[v0:v1] = dz.sum(dim=0, dtype=torch.float32)
    return (
        dh.to(h.dtype) if need_h else None,
        dw,
        db.to(bias.dtype) if need_b else None,
    )


# --------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (python -m tools.aot_report)
# --------------------------------------------------------------------------------------------------

# Pointer arguments of each kernel: "in" (the compute dtype), fp32, or int64.
_AOT_POINTERS = {
    "forward": {
        "h_ptr": "in",
        "w_ptr": "in",
        "b_ptr": "in",
        "t_ptr": "i64",
        "part_max_ptr": "fp32",
        "part_sum_ptr": "fp32",
        "part_tgt_ptr": "fp32",
    },
    "softmax_grad": {
        "z_ptr": "fp32",
        "dz_ptr": "in",
        "b_ptr": "in",
        "t_ptr": "i64",
        "lse_ptr": "fp32",
        "g_ptr": "fp32",
    },
}
# The shape the specifications describe: LLaDA's head, 4001 selected rows (not a multiple of 16, as
# the JIT sees most calls), on an H100 of the GPU table.
AOT_SHAPE = dict(n=4001, H=4096, V=126464, gpu="h100")


def _aot_scalars(kind: str, dtype: str, n: int, H: int, V: int, gpu: str) -> dict:
    """The scalar arguments a call on ``n`` selected rows passes, as the launchers above compute them."""
    torch_dtype = {v: k for k, v in DTYPE_NAMES.items()}[dtype]
    if kind == "forward":
        _, per_split = gpu_vocab_split(n, V, torch_dtype, gpu)
        return {"n": n, "V": V, "K": H, "stride_h": H, "stride_w": H, "tiles_per_split": per_split, "floor": FLOOR}
    # A later chunk of the default budget's buffer; 16-bit dz is its storage viewed in the compute dtype.
    C = grad_chunk_cols(n, V, DEFAULT_MAX_BUFFER_BYTES)
    return {"C": C, "v0": C, "stride_z": C, "stride_dz": C if dtype == "fp32" else 2 * C}


def aot_specs() -> list[dict]:
    """Every kernel configuration the dispatch launches on an H100 at :data:`AOT_SHAPE` (both dot
    precisions of the fp32 forward). Each entry: name, fn, signature, constexprs, attrs, num_warps,
    num_stages."""
    if not triton_available():
        return []
    n, H, V, gpu = AOT_SHAPE["n"], AOT_SHAPE["H"], AOT_SHAPE["V"], AOT_SHAPE["gpu"]
    specs = []
    for (kind, dtype), cfg in _GPU_CONFIGS.items():
        fn = _lse_forward_kernel if kind == "forward" else _softmax_grad_kernel
        ptrs = {arg: dtype if ty == "in" else ty for arg, ty in _AOT_POINTERS[kind].items()}
        tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        precisions = (("tf32", "ieee") if dtype == "fp32" else ("tf32",)) if kind == "forward" else (None,)
        for precision in precisions:
            extra = {} if precision is None else {"DOT_PRECISION": precision, "UPCAST_DOT": False}
            tag = "" if precision is None or dtype != "fp32" else f",{precision}"
            for has_bias in (False, True):
                specs.append(
                    aot_spec(
                        f"masked_linear_ce.{kind}[{dtype}{tag},bias={int(has_bias)},H={H},V={V}]",
                        fn,
                        ptrs,
                        _aot_scalars(kind, dtype, n, H, V, gpu),
                        {"HAS_BIAS": has_bias, **tiles, **extra},
                        cfg["num_warps"],
                        cfg["num_stages"],
                    )
                )
    return specs
