"""A cost model of the GPU kernels, runnable without a GPU.

    python -m tools.roofline [--gpu h100|h200|a100] [--shape N,H,V] [--attn-shape B,S,H,D]

For every kernel launch of the masked linear cross-entropy (forward + backward, N selected rows,
hidden H, vocabulary V, bf16) and of the attention (forward + backward, B sequences of S tokens, H
heads of dim D, bf16, one sample per row) it prints the FLOPs, the HBM bytes, the roofline time
``max(FLOPs / peak, bytes / bandwidth)`` and an expected time, then two figures per op:

* the ideal, a floor: masked CE ``8 N H V`` FLOPs at peak (the forward's logits, and in the backward
  dlogits' two products plus the logits again, or any other schedule: four GEMM-equivalents is the
  least); attention seven matmuls of ``2 B H S^2 D`` FLOPs at peak (FlashAttention-2's count);
* the expected time, an estimate: each launch at the efficiencies below, times its wave quantization.

Achievable efficiencies (EFFICIENCY; assumptions with public sources, to be replaced by the first GPU
run's measurements, ``python -m benchmarks.gpu_check``):

* cuBLAS bf16 GEMMs of these sizes: 70% of the dense peak (NVIDIA, "New cuBLAS 12.0 Features and Matrix
  Multiplication Performance on NVIDIA Hopper GPUs", developer blog, 2023; FlashAttention-3, Shah et
  al. 2024, arXiv:2407.08608, reaches 75% with a hand-scheduled Hopper kernel, an upper reference);
* Triton ``tl.dot`` kernels (our forward and attention, no warp specialisation): 35% of peak, what
  FlashAttention-2 reaches on an H100 (FlashAttention-3 paper, abstract and Sec. 4);
* HBM traffic: 90% of the datasheet bandwidth (STREAM-copy class kernels on HBM3).

Wave quantization: a launch of P equal programs with S resident slots runs ``ceil(P / S)`` waves, so
it takes ``ceil(P / S) * S / P`` times its smooth share; cuBLAS GEMMs are counted in output tiles of
128 x 256 (CUTLASS's large-GEMM Hopper tile) over the SMs.

The counts come from the code that runs: the grids, tiles and loops of the Triton kernels (tile
sizes and splits read from the kernels' own configurations and launch helpers), and the GEMMs that
``masked_linear_ce``'s backward sends to cuBLAS. The model's assumptions:

* tensor-core FLOPs only (``2 M N K`` per ``tl.dot`` of padded tiles, as launched); softmax
  exponentials and other element-wise work are not counted;
* a Triton kernel's programs run in launch order in waves of the GPU's resident slots (the forward:
  :data:`vrpo_kernels.masked_linear_ce.triton_path.FORWARD_BLOCKS_PER_SM` per SM; elementwise kernels
  without ``tl.dot``: as many as the SM's 64 warps allow); within a wave every distinct row of an
  operand is read from HBM once (the L2 serves the other programs), nothing survives between waves;
* a cuBLAS GEMM reads each operand once and writes (or reads and writes, when accumulating) its
  output once;
* launches do not overlap.

Peaks and SM counts: the one GPU table, :mod:`vrpo_kernels.gpus` (public datasheet figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from collections.abc import Iterable, Iterator

import torch

from vrpo_kernels.attention import _block_d, sm90_config
from vrpo_kernels.gpus import GPU, GPUS
from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES, gemm, triton_path
from vrpo_kernels.masked_linear_ce.common import DTYPE_NAMES

_ELEMENT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}

#: Achievable fractions of the peaks (sources in the module docstring).
EFFICIENCY = {"cublas": 0.70, "triton": 0.35, "hbm": 0.90}
CUBLAS_TILE = (128, 256)


@dataclasses.dataclass
class Launch:
    """One kernel launch (or ``count`` identical ones): what it computes and moves. ``kind``: "cublas",
    "triton" or "torch" (elementwise); ``quantization``: its wave quantization factor (>= 1)."""

    name: str
    flops: float
    bytes: float
    grid: str = ""
    count: int = 1
    kind: str = "torch"
    quantization: float = 1.0
    peak: str = "bf16"  # the tensor-core rate its FLOPs run at: "bf16" (16-bit operands) or "tf32"

    def flops_per_s(self, gpu: GPU) -> float:
        return gpu.tf32_flops if self.peak == "tf32" else gpu.bf16_flops

    def seconds(self, gpu: GPU) -> float:
        """The roofline time at the datasheet peaks."""
        return self.count * max(self.flops / self.flops_per_s(gpu), self.bytes / gpu.bandwidth)

    def expected_seconds(self, gpu: GPU) -> float:
        """The estimate: achievable efficiencies and wave quantization."""
        compute = self.flops / (self.flops_per_s(gpu) * EFFICIENCY.get(self.kind, 1.0)) if self.flops else 0.0
        memory = self.bytes / (gpu.bandwidth * EFFICIENCY["hbm"])
        return self.count * max(compute, memory) * self.quantization

    def bound(self, gpu: GPU) -> str:
        return "compute" if self.flops / self.flops_per_s(gpu) >= self.bytes / gpu.bandwidth else "memory"


def wave_quantization(programs: int, slots: int) -> float:
    """``ceil(P / S) * S / P``: the time of P equal programs in waves of S, over their smooth share."""
    return -(-programs // slots) * slots / programs if programs else 1.0


@dataclasses.dataclass(frozen=True)
class Program:
    """What one Triton program does. reads: (operand key, first row, end row, bytes per row); the
    same key names the same tensor (and rows) across programs."""

    reads: tuple[tuple[tuple, int, int, int], ...]
    write_bytes: int
    flops: int


def _union_length(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def triton_launch(name: str, programs: Iterable[Program], per_wave: int, grid: str) -> Launch:
    """A Triton launch from its programs in launch order, with the wave model of the module docstring."""
    flops = writes = reads = count = 0
    wave: dict[tuple, list[tuple[int, int]]] = {}
    row_bytes: dict[tuple, int] = {}

    def flush():
        nonlocal reads
        reads += sum(_union_length(iv) * row_bytes[key] for key, iv in wave.items())
        wave.clear()

    for i, prog in enumerate(programs):
        if i and i % per_wave == 0:
            flush()
        count += 1
        flops += prog.flops
        writes += prog.write_bytes
        for key, lo, hi, nbytes in prog.reads:
            if hi > lo:
                wave.setdefault(key, []).append((lo, hi))
                row_bytes[key] = nbytes
    flush()
    return Launch(name, flops, reads + writes, grid, kind="triton", quantization=wave_quantization(count, per_wave))


def gemm_launch(
    name: str,
    m: int,
    n: int,
    k: int,
    a_bytes: int,
    b_bytes: int,
    out_bytes: int,
    accumulate: bool = False,
    sms: int = 132,
    peak: str = "bf16",
) -> Launch:
    """cuBLAS ``out[m, n] (+)= a[m, k] @ b[k, n]``; *_bytes are bytes per element; ``peak``: "tf32" for
    an fp32 GEMM in TF32."""
    traffic = m * k * a_bytes + k * n * b_bytes + m * n * out_bytes * (2 if accumulate else 1)
    tiles = _cdiv(m, CUBLAS_TILE[0]) * _cdiv(n, CUBLAS_TILE[1])
    return Launch(
        name,
        2 * m * n * k,
        traffic,
        f"cuBLAS {m}x{n}x{k}",
        kind="cublas",
        quantization=wave_quantization(tiles, sms),
        peak=peak,
    )


def fp32_out_gemm(name: str, form: str, m: int, n: int, k: int, es: int, sms: int) -> list[Launch]:
    """The launches of one fp32-output product ``out[m, n] (+)= a @ b`` of 16-bit operands in ``form``
    (:mod:`vrpo_kernels.masked_linear_ce.gemm`): one GEMM (``out_dtype``, ``addmm_out_dtype``), a GEMM
    into scratch plus an fp32 add (``mm_out_dtype_add``, ``scratch16_add``), or the operands upcast to
    fp32 and TF32 GEMMs (``upcast``, ``upcast_add``)."""
    acc = form in gemm.ACCUMULATES
    if form in ("out_dtype", "addmm_out_dtype"):
        return [gemm_launch(name, m, n, k, es, es, 4, accumulate=acc, sms=sms)]
    if form in ("mm_out_dtype_add", "scratch16_add"):
        out_es = 4 if form == "mm_out_dtype_add" else es
        return [
            gemm_launch(f"{name} [{form}]", m, n, k, es, es, out_es, sms=sms),
            elementwise_launch(f"{name}: add into fp32", m * n * (out_es + 8)),
        ]
    if form in ("upcast", "upcast_add"):
        return [
            elementwise_launch(f"{name}: upcast operands to fp32", (m * k + k * n) * (es + 4)),
            gemm_launch(f"{name} [{form}, TF32]", m, n, k, 4, 4, 4, accumulate=acc, sms=sms, peak="tf32"),
        ]
    raise ValueError(f"unknown GEMM form {form!r}")


def elementwise_launch(name: str, nbytes: float) -> Launch:
    return Launch(name, 0, nbytes, "torch")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(x: int, block: int) -> int:
    return _cdiv(x, block) * block


# --------------------------------------------------------------------------------------------------
# masked_linear_ce (vrpo_kernels.masked_linear_ce: its Triton forward, its cuBLAS + Triton backward)
# --------------------------------------------------------------------------------------------------


def masked_ce_launches(
    n: int,
    H: int,
    V: int,
    gpu: GPU,
    dtype=torch.bfloat16,
    bias: bool = False,
    max_buffer_bytes: int | None = None,
    strategy: gemm.GemmStrategy | None = None,
) -> list[Launch]:
    """The launches of ``masked_linear_ce(impl="triton")`` forward + backward on ``n`` selected rows, the
    backward's fp32-output GEMMs in ``strategy``'s forms (default :func:`expected_cuda_strategy`)."""
    es = _ELEMENT_BYTES[dtype]
    strategy = strategy or expected_cuda_strategy()
    cuda = torch.device("cuda")
    budget = DEFAULT_MAX_BUFFER_BYTES if max_buffer_bytes is None else max_buffer_bytes
    launches = []

    # Forward: _lse_forward_kernel, grid (row blocks, vocabulary splits), row blocks fastest.
    cfg = triton_path._config("forward", dtype, cuda)
    bm, bv, bk = cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    m_blocks, n_tiles = _cdiv(n, bm), _cdiv(V, bv)
    slots = gpu.sms * triton_path.FORWARD_BLOCKS_PER_SM[DTYPE_NAMES[dtype]]
    splits, per_split = triton_path.vocab_split(m_blocks, n_tiles, slots)

    def forward_programs() -> Iterator[Program]:
        for split in range(splits):
            t0 = split * per_split
            tiles = max(0, min(n_tiles, t0 + per_split) - t0)
            v0, v1 = t0 * bv, min(V, (t0 + tiles) * bv)
            for mb in range(m_blocks):
                r0, r1 = mb * bm, min(n, (mb + 1) * bm)
                reads = [(("h",), r0, r1, H * es), (("W",), v0, v1, H * es), (("targets",), r0, r1, 8)]
                if bias:
                    reads.append((("bias",), v0, v1, es))
                yield Program(tuple(reads), 3 * 4 * (r1 - r0), 2 * bm * tiles * bv * _pad(H, bk))

    launches.append(
        triton_launch(
            "ce fwd: _lse_forward_kernel",
            forward_programs(),
            slots,
            f"({m_blocks}, {splits}) x {cfg['num_warps']} warps",
        )
    )
    # The splits' partials (3 x [splits, n] fp32) merged by torch: read twice, lse and logp written.
    launches.append(elementwise_launch("ce fwd: merge splits (torch)", 2 * 3 * splits * n * 4 + 2 * n * 4))

    # Backward: chunks of `cols` vocabulary columns, each: logits GEMM (fp32 out), the in-place softmax
    # gradient pass, dW[chunk] GEMM (written once), dH GEMM (fp32 accumulator when there are several).
    cols = triton_path.grad_chunk_cols(n, V, budget)
    chunks = triton_path.vocab_chunks(V, cols)
    gcfg = triton_path._config("softmax_grad", dtype, cuda)
    one_chunk = len(chunks) == 1
    if not one_chunk:
        launches.append(elementwise_launch("ce bwd: zero the fp32 dH accumulator", n * H * 4))
    for i, (v0, v1) in enumerate(chunks):
        c = v1 - v0
        tag = f"ce bwd chunk {i + 1}/{len(chunks)} ({c} columns)"
        launches += fp32_out_gemm(f"{tag}: logits = h W^T", strategy.product, n, c, H, es, gpu.sms)

        def grad_programs(c=c):
            for row in range(n):
                reads = [(("logits",), row, row + 1, c * 4), (("row stats",), row, row + 1, 8 + 4 + 4)]
                if bias:
                    reads.append((("bias",), 0, c, es))
                yield Program(tuple(reads), c * es, 0)

        per_wave = gpu.sms * (gpu.warps_per_sm // gcfg["num_warps"])
        launches.append(
            triton_launch(
                f"{tag}: _softmax_grad_kernel", grad_programs(), per_wave, f"({n},) x {gcfg['num_warps']} warps"
            )
        )
        launches.append(gemm_launch(f"{tag}: dW[chunk] = dz^T h", c, H, n, es, es, es, sms=gpu.sms))
        if one_chunk:
            launches.append(gemm_launch(f"{tag}: dH (+)= dz W[chunk]", n, H, c, es, es, es, sms=gpu.sms))
        else:
            launches += fp32_out_gemm(f"{tag}: dH (+)= dz W[chunk]", strategy.accumulate, n, H, c, es, gpu.sms)
        if bias:
            launches.append(elementwise_launch(f"{tag}: db[chunk] = dz.sum(0)", n * c * es + c * 4))
    if not one_chunk:
        launches.append(elementwise_launch("ce bwd: dH fp32 -> compute dtype", n * H * (4 + es)))
    return launches


def expected_cuda_strategy() -> gemm.GemmStrategy:
    """The GEMM forms :func:`vrpo_kernels.masked_linear_ce.gemm.detect` finds on CUDA with this torch,
    without a GPU: ``torch.mm(out_dtype=)`` from torch 2.8; ``addmm(out_dtype=)`` with an fp32 ``self``
    only once pytorch#167931 landed (torch 2.10), else one GEMM into scratch and an add. On a GPU pass
    ``gemm.strategy_for(device, dtype)``, the form actually chosen."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 8):
        return gemm.GemmStrategy("upcast", "scratch16_add")
    return gemm.GemmStrategy("out_dtype", "addmm_out_dtype" if version >= (2, 10) else "mm_out_dtype_add")


def masked_ce_ideal_seconds(n: int, H: int, V: int, gpu: GPU) -> float:
    return 8 * n * H * V / gpu.bf16_flops


# --------------------------------------------------------------------------------------------------
# bidirectional_attention (vrpo_kernels.attention, one sample per row, [B, S, H, D] views)
# --------------------------------------------------------------------------------------------------


def attention_launches(
    B: int, S: int, H: int, D: int, gpu: GPU, n_kv_heads: int | None = None, dtype=torch.bfloat16
) -> list[Launch]:
    """The launches of ``bidirectional_attention(impl="triton")`` forward + backward on Hopper tiles,
    every row one sample (each query block visits every key block)."""
    Hkv = n_kv_heads or H
    group = H // Hkv
    es = _ELEMENT_BYTES[dtype]
    cfgs = sm90_config(D)
    bd = _block_d(D)
    row = D * es  # bytes of one token's head vector (masked loads read only the HEAD_DIM columns)
    launches = []

    def query_programs(c, dots, extra_q_operands, stats_reads, out_row_bytes):
        """Programs of the forward and dQ kernels: one query block of one (batch, head), tiles fastest."""
        n_tiles = _cdiv(S, c.block_m)
        kv_end = min(S, _pad(S, c.block_n))
        n_kblocks = _cdiv(S, c.block_n)
        for bh in range(B * H):
            b, h = divmod(bh, H)
            hk = h // group
            for t in range(n_tiles):
                r0, r1 = t * c.block_m, min(S, (t + 1) * c.block_m)
                reads = [
                    (("q", b, h), r0, r1, row),
                    (("seg", b), r0, r1, 4),
                    (("span", b), r0, r1, 8),
                    (("seg", b), 0, kv_end, 4),
                    (("k", b, hk), 0, kv_end, row),
                    (("v", b, hk), 0, kv_end, row),
                ]
                reads += [((name, b, h), r0, r1, row) for name in extra_q_operands]
                reads += [((name, b, h), r0, r1, 4) for name in stats_reads]
                yield Program(
                    tuple(reads), (r1 - r0) * out_row_bytes, n_kblocks * dots * 2 * c.block_m * c.block_n * bd
                )

    c = cfgs.fwd
    launches.append(
        triton_launch(
            "attn fwd: _attn_fwd (+LSE)",
            query_programs(c, 2, (), (), row + 4),
            gpu.sms,
            f"({_cdiv(S, c.block_m) * B * H},) x {c.num_warps} warps",
        )
    )

    c = cfgs.delta

    def delta_programs():
        for bh in range(B * H):
            b, h = divmod(bh, H)
            for t in range(_cdiv(S, c.block_m)):
                r0, r1 = t * c.block_m, min(S, (t + 1) * c.block_m)
                yield Program(((("out", b, h), r0, r1, row), (("do", b, h), r0, r1, row)), (r1 - r0) * 4, 0)

    launches.append(
        triton_launch(
            "attn bwd: _attn_bwd_delta",
            delta_programs(),
            gpu.sms * (gpu.warps_per_sm // c.num_warps),
            f"({_cdiv(S, c.block_m) * B * H},) x {c.num_warps} warps",
        )
    )

    c = cfgs.dkdv

    def dkdv_programs():
        n_qblocks = _cdiv(S, c.block_m)
        q_end = min(S, _pad(S, c.block_m))
        for bhk in range(B * Hkv):
            b, hk = divmod(bhk, Hkv)
            for t in range(_cdiv(S, c.block_n)):
                r0, r1 = t * c.block_n, min(S, (t + 1) * c.block_n)
                reads = [
                    (("k", b, hk), r0, r1, row),
                    (("v", b, hk), r0, r1, row),
                    (("seg", b), r0, r1, 4),
                    (("span", b), r0, r1, 8),
                    (("seg", b), 0, q_end, 4),
                ]
                for h in range(hk * group, (hk + 1) * group):
                    reads += [
                        (("q", b, h), 0, q_end, row),
                        (("do", b, h), 0, q_end, row),
                        (("lse", b, h), 0, q_end, 4),
                        (("delta", b, h), 0, q_end, 4),
                    ]
                flops = group * n_qblocks * 4 * 2 * c.block_n * c.block_m * bd
                yield Program(tuple(reads), 2 * (r1 - r0) * row, flops)

    launches.append(
        triton_launch(
            "attn bwd: _attn_bwd_dkdv",
            dkdv_programs(),
            gpu.sms,
            f"({_cdiv(S, c.block_n) * B * Hkv},) x {c.num_warps} warps",
        )
    )

    c = cfgs.dq
    launches.append(
        triton_launch(
            "attn bwd: _attn_bwd_dq",
            query_programs(c, 3, ("do",), ("lse", "delta"), row),
            gpu.sms,
            f"({_cdiv(S, c.block_m) * B * H},) x {c.num_warps} warps",
        )
    )
    return launches


def attention_ideal_seconds(B: int, S: int, H: int, D: int, gpu: GPU) -> float:
    return 7 * 2 * B * H * S * S * D / gpu.bf16_flops


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _table(launches: list[Launch], gpu: GPU, out) -> tuple[float, float]:
    """Print one line per launch; returns (roofline seconds, expected seconds) of the total."""
    width = max(len(x.name) for x in launches)
    print(
        f"  {'launch':<{width}}  {'grid':<26} {'GFLOP':>10} {'HBM MB':>10} {'ms':>8} {'exp. ms':>8} {'waves':>6}  bound",  # noqa: E501
        file=out,
    )
    total = expected = 0.0
    for x in launches:
        t, e = x.seconds(gpu), x.expected_seconds(gpu)
        total += t
        expected += e
        print(
            f"  {x.name:<{width}}  {x.grid:<26} {x.flops * x.count / 1e9:>10.1f} {x.bytes * x.count / 1e6:>10.1f} "
            f"{t * 1e3:>8.3f} {e * 1e3:>8.3f} {x.quantization:>6.2f}  {x.bound(gpu)}",
            file=out,
        )
    flops = sum(x.flops * x.count for x in launches)
    nbytes = sum(x.bytes * x.count for x in launches)
    print(
        f"  {'total':<{width}}  {'':<26} {flops / 1e9:>10.1f} {nbytes / 1e6:>10.1f} {total * 1e3:>8.3f} "
        f"{expected * 1e3:>8.3f}",
        file=out,
    )
    return total, expected


@dataclasses.dataclass(frozen=True)
class Prediction:
    masked_ce_s: float
    masked_ce_ideal_s: float
    attention_s: float
    attention_ideal_s: float
    masked_ce_expected_s: float = 0.0
    attention_expected_s: float = 0.0

    def summary(self) -> str:
        return (
            f"masked_ce predicted {self.masked_ce_s * 1e3:.2f} ms, ideal {self.masked_ce_ideal_s * 1e3:.2f} ms, "
            f"ratio {self.masked_ce_s / self.masked_ce_ideal_s:.2f}; attention predicted "
            f"{self.attention_s * 1e3:.2f} ms, ideal {self.attention_ideal_s * 1e3:.2f} ms, "
            f"ratio {self.attention_s / self.attention_ideal_s:.2f}"
        )

    def expected_summary(self) -> str:
        return (
            f"masked_ce expected {self.masked_ce_expected_s * 1e3:.2f} ms (an estimate) beside ideal "
            f"{self.masked_ce_ideal_s * 1e3:.2f} ms (a floor); attention expected "
            f"{self.attention_expected_s * 1e3:.2f} ms beside ideal {self.attention_ideal_s * 1e3:.2f} ms"
        )


def _ideal_lines(what: str, ideal: float, expected: float, sink) -> None:
    print(f"  ideal: {what} at peak = {ideal * 1e3:.3f} ms (a floor)", file=sink)
    print(
        f"  expected: {expected * 1e3:.3f} ms (an estimate: cuBLAS {EFFICIENCY['cublas']:.0%}, Triton dots "
        f"{EFFICIENCY['triton']:.0%} of peak, HBM {EFFICIENCY['hbm']:.0%}, wave quantization)\n",
        file=sink,
    )


def predict(
    gpu: GPU,
    ce_shape=(4096, 4096, 126464),
    attn_shape=(8, 4096, 32, 128),
    out=None,
    strategy: gemm.GemmStrategy | None = None,
) -> Prediction:
    """Print both tables to ``out`` (when given) and return the totals; ``strategy``: the backward's
    GEMM forms (default :func:`expected_cuda_strategy`)."""
    sink = out if out is not None else io.StringIO()
    N, H, V = ce_shape
    B, S, Hh, D = attn_shape
    print(f"masked linear CE forward + backward, impl='triton', bf16, N_sel={N}, H={H}, V={V}:", file=sink)
    print(f"  backward GEMM forms: {strategy or expected_cuda_strategy()}", file=sink)
    ce, ce_exp = _table(masked_ce_launches(N, H, V, gpu, strategy=strategy), gpu, sink)
    ce_ideal = masked_ce_ideal_seconds(N, H, V, gpu)
    _ideal_lines(f"8*N*H*V = {8 * N * H * V / 1e12:.2f} TFLOP", ce_ideal, ce_exp, sink)
    print(
        f"bidirectional attention forward + backward, impl='triton', bf16, {B} x {S} tokens, {Hh} heads, head dim {D}:",
        file=sink,
    )
    at, at_exp = _table(attention_launches(B, S, Hh, D, gpu), gpu, sink)
    at_ideal = attention_ideal_seconds(B, S, Hh, D, gpu)
    _ideal_lines(f"7 matmuls x 2*B*H*S^2*D = {14 * B * Hh * S * S * D / 1e12:.2f} TFLOP", at_ideal, at_exp, sink)
    return Prediction(ce, ce_ideal, at, at_ideal, ce_exp, at_exp)


def _ints(text: str, n: int, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{flag} takes {n} positive integers separated by commas, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument(
        "--shape",
        default="4096,4096,126464",
        type=lambda s: _ints(s, 3, "--shape"),
        help="masked CE: selected rows N, hidden H, vocabulary V (default %(default)s)",
    )
    parser.add_argument(
        "--attn-shape",
        default="8,4096,32,128",
        type=lambda s: _ints(s, 4, "--attn-shape"),
        help="attention: sequences B, tokens S, heads H, head dim D (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.attn_shape[3] > 128:
        parser.error(f"--attn-shape: head dim {args.attn_shape[3]} exceeds 128, the largest the kernels support")
    gpu = GPUS[args.gpu]
    print(
        f"{gpu.name}: public peaks {gpu.bf16_flops / 1e12:.0f} TFLOP/s dense bf16, {gpu.bandwidth / 1e12:.2f} TB/s "
        f"HBM (NVIDIA datasheet), {gpu.sms} SMs; time per launch = max(FLOPs / peak, bytes / bandwidth)\n"
    )
    pred = predict(gpu, args.shape, args.attn_shape, out=sys.stdout)
    print(pred.expected_summary())
    print(pred.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
