"""One command on the first GPU: preflight, correctness, determinism, training steps, timings.

    python -m benchmarks.gpu_check --quick     # first: one H100/H200, <= 3 minutes with a cold Triton cache
    python -m benchmarks.gpu_check             # then the full check, <= 6 minutes
    python -m benchmarks.gpu_check --dry-run [--gpu-shapes]  # the same code on the CPU, CUDA's rules
    python -m benchmarks.gpu_check --estimate  # the time estimate of both, without a GPU

What it checks, what a pass proves and what it does not, and how the times were estimated:
docs/gpu_check.md. Sections (each check in its own try/except, so one failure does not end the run; the
elapsed time per section is printed and written):

1. preflight: ``TRITON_INTERPRET`` unset (set, in the dry run) and ``impl="auto"`` resolving to Triton for
   every op, the fp32 matmul precision in force (:func:`vrpo_kernels.dispatch.fp32_matmul_precision`);
2. correctness against float64 (:func:`ce_compare`, streamed over the vocabulary): ``masked_linear_ce``
   in bf16/fp16, and fp32 with TF32 off and on, with and without a bias, at (1, 4096, 126464), (300 of
   1000 rows, 4096, 126464), (37, 4095, 50257), (5000, 64, 7), targets on the backward's chunk edges; a
   ``-inf`` bias over the first vocabulary tile, a forward-only 65,536-row call, multi-chunk backwards,
   every GEMM form, bf16 autocast, offsets past 2^31; ``bidirectional_attention`` (:data:`GPU_PLAN`'s
   ``attn_cases``: bf16 and fp16 at both ends of S); ``sample_masks`` counts exact;
3. determinism: each op twice, ``torch.equal``;
4. training: one VRPO step of the tiny LLaDA in bf16 with every kernel on ``impl="auto"`` (as a user's
   GPU run), the README's quick start (``python -m vrpo.train --max_steps 20``), and (full check) a
   random LLaDA-architecture model of about 1.1B parameters in bf16 whose ``max_memory_allocated`` must
   lie within ``vrpo.plan``'s peak and 10% below it (:func:`check_planned_peak`);
5. timings (``triton.testing.do_bench``, median ms, forward + backward): ours against eager torch and
   ``torch.compile`` (masked CE), SDPA and flash-attn (attention), CCE and Liger, as measured ratios; the
   cost model's prediction (``python -m tools.roofline``) in a column of its own.

Inputs are realistic, not uniform: each row's hidden state points at one "predicted" token (its
target half of the time), so the softmax has a top probability of about 0.5 and an entropy of a few
nats, as a trained LM head's (:func:`ce_inputs`); with random inputs the softmax part of the gradient
is ~1/V of it and a backward that dropped it would pass.

Tolerances (:func:`ce_compare`): (1) max |got - ref| / max(max |ref|, 0.01) under 8 units of roundoff
of the arithmetic that runs: bf16 2^-8, fp16 2^-11, fp32 2^-11; (2) the softmax part of each gradient
on its own, norm-relative, under the rounding-error bound of the operations at the precision in force
(:func:`_bound_terms`); (3) d_weight and d_bias per vocabulary row, under each row's own bound.

The dry run is CUDA-faithful: CPU tensors follow CUDA's dispatch and dtype rules
(:func:`vrpo_kernels.dispatch.emulate_cuda`), and TF32 is emulated where the GPU would use it
(:func:`cuda_precision`). Planted bugs: ``--dry-run [--gpu-shapes] --plant BUG`` runs the correctness
checks of the op a deliberately broken kernel belongs to (:data:`PLANTS`: onehot_only, skip_last_chunk,
stale_lse, zero_column, int32_offsets, no_segment_mask, mask_count_off_by_one); each must make the run
exit 1 naming the failing check.

Writes ``gpu_check.md`` atomically (device, driver, CUDA, torch and Triton versions, every check and
timing) into ``--out``: ``benchmarks/results`` for the GPU run, a temporary directory for ``--dry-run``
(never over the committed results). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from unittest import mock

import torch

# A LLaDA-architecture model of about 1.1B parameters: LLaDA 8B's head dim (128), vocabulary and
# embedding, 12 layers of width 2048 (untied head: 2 x 259M embedding parameters + 12 x 51M).
LLADA_1B = dict(
    d_model=2048, n_heads=16, n_layers=12, mlp_hidden_size=5632, vocab_size=126464, max_sequence_length=4096
)
TINY_STEP_MODEL = dict(d_model=64, n_heads=2, n_layers=2, mlp_hidden_size=96, vocab_size=256, max_sequence_length=128)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run: the GPU plan (full or ``--quick``), or the CPU dry run's tiny version of each item."""

    ce_cases: tuple  # (rows N, selected rows, H, V)
    ce_dtypes: tuple  # torch dtypes; fp32 runs twice, with TF32 off ("ieee") and on ("tf32")
    ce_forward_only: tuple  # (rows N, H, V, rows compared with the reference), or ()
    ce_multi_chunk: tuple  # ((N, selected, H, V, max_buffer_bytes or None), ...): several vocabulary chunks
    ce_offsets_64: tuple  # (rows, H, V, rows compared): n_sel * H > 2^31 in a no-grad forward, or ()
    ce_autocast: tuple  # (N, selected, H, V): bf16 autocast with fp32 master weights, or ()
    attn_cases: tuple  # ((head dim D, GQA group, S, dtype), ...)
    attn_batch_heads: tuple  # (B, query heads)
    mask_lengths: tuple
    step_models: tuple  # (name, model spec, pairs per step, n_t, dtype)
    bench_ce: tuple  # (N, H, V)
    bench_ce_dtype: torch.dtype
    bench_attn: tuple  # (B, S, H, D)
    quickstart_steps: int  # python -m vrpo.train --max_steps (the README's quick start)
    gpu_shapes: tuple = ()  # dry run --gpu-shapes: ((N, selected, H, V, bias), ...) on the torch path
    memory_check: bool = False  # the 1.1B step's peak against vrpo.plan
    peers: bool = False  # peer timings (CCE, Liger, torch.compile, flash-attn) and agreement checks


def attention_grid(head_dims, groups, lengths) -> tuple:
    """Attention cases over head dims x GQA groups x lengths, the dtype alternating so that every length
    (both ends included) runs in both bf16 and fp16 when there are two groups (and across head dims)."""
    dtypes = (torch.bfloat16, torch.float16)
    return tuple(
        (D, g, S, dtypes[(i + j + k) % 2])
        for i, D in enumerate(head_dims)
        for j, g in enumerate(groups)
        for k, S in enumerate(lengths)
    )


# Attention on the GPU: LLaDA's head dim 128 at every length, GQA 1 and 4, both dtypes at both ends;
# the other head dims (32, 64, and 80, 96: padded to a 128-wide tile) at a short and the longest length,
# both dtypes across them (GQA is independent of the head dim: the kernels index KV heads by h // group).
_GPU_ATTN_QUICK = attention_grid((128,), (1, 4), (1, 127, 1000, 4096))
_GPU_ATTN_FULL = _GPU_ATTN_QUICK + attention_grid((32, 64, 80, 96), (1,), (127, 4096))

GPU_PLAN = Plan(
    ce_cases=((1, 1, 4096, 126464), (1000, 300, 4096, 126464), (37, 37, 4095, 50257), (5000, 5000, 64, 7)),
    ce_dtypes=(torch.bfloat16, torch.float16, torch.float32),
    ce_forward_only=(65536, 4096, 126464, 512),
    # 4000 rows at the default budget: 67,072 columns, 2 chunks; 2500 rows at 64 MiB: 6,656 columns, 19 chunks.
    ce_multi_chunk=((5000, 4000, 4096, 126464, None), (3000, 2500, 4096, 126464, 64 << 20)),
    # 524,800 x 4,096 = 2^31 + 2^21 elements: the last rows' offsets pass 2^31 (524,288 rows end exactly at it).
    ce_offsets_64=(524800, 4096, 126464, 256),
    ce_autocast=(1000, 700, 4096, 126464),
    attn_cases=_GPU_ATTN_FULL,
    attn_batch_heads=(2, 8),
    mask_lengths=(1, 1023, 1024, 1025, 8192),
    step_models=(
        ("tiny LLaDA, bf16", TINY_STEP_MODEL, 4, 8, torch.bfloat16),
        ("LLaDA-architecture 1.1B, bf16", LLADA_1B, 2, 8, torch.bfloat16),
    ),
    bench_ce=(4096, 4096, 126464),
    bench_ce_dtype=torch.bfloat16,
    bench_attn=(8, 4096, 32, 128),
    quickstart_steps=20,
    memory_check=True,
    peers=True,
)
# --quick: the training step of the README's demo and its quick start, masked CE (bf16; fp32 with TF32 on
# and off) and attention (bf16 and fp16) at the real shapes, one timing each; no 1.1B step, no peers, no
# 2^31 case, no fp16 masked CE.
QUICK_PLAN = dataclasses.replace(
    GPU_PLAN,
    ce_cases=((1000, 300, 4096, 126464), (37, 37, 4095, 50257)),
    ce_dtypes=(torch.bfloat16, torch.float32),
    ce_forward_only=(),
    ce_offsets_64=(),
    ce_autocast=(),
    ce_multi_chunk=((5000, 4000, 4096, 126464, None),),
    attn_cases=_GPU_ATTN_QUICK,
    mask_lengths=(1, 1025, 8192),
    step_models=GPU_PLAN.step_models[:1],
    memory_check=False,
    peers=False,
)
DRY_PLAN = Plan(
    ce_cases=((1, 1, 32, 70), (12, 5, 32, 70), (7, 7, 31, 33)),
    # bf16 (the GPU plan's dtype; its forward kernel upcasts the tiles before tl.dot in the interpreter,
    # see vrpo_kernels._triton_utils.upcast_dots) and fp32 with TF32 off and on (emulated: the operands
    # rounded to TF32 in the interpreter's dots and in the backward's fp32 GEMMs).
    ce_dtypes=(torch.bfloat16, torch.float32),
    ce_forward_only=(40, 32, 70, 8),
    ce_multi_chunk=((12, 9, 32, 300, 4 * 9 * 128),),  # 3 chunks of 128, 128, 44 columns
    ce_offsets_64=(40, 64, 70, 40),  # the kernel on a row-strided view whose offsets pass 2^31
    ce_autocast=(12, 9, 32, 70),
    attn_cases=attention_grid((24,), (1, 2), (1, 21)),
    attn_batch_heads=(1, 2),
    mask_lengths=(1, 40),
    step_models=(("tiny LLaDA, one layer, bf16", dict(TINY_STEP_MODEL, n_layers=1), 1, 2, torch.bfloat16),),
    bench_ce=(16, 32, 70),
    bench_ce_dtype=torch.bfloat16,
    bench_attn=(1, 24, 2, 16),
    quickstart_steps=1,
)
# --dry-run --gpu-shapes: the masked-CE checks at the GPU plan's head (H = 4096 or 4095, V = 126,464 or
# 50,257) on a few dozen rows, through the torch path (the interpreter would take minutes per call).
GPU_SHAPES = ((48, 32, 4096, 126464, False), (37, 37, 4095, 50257, True))

_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}
_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}  # unit roundoff
_FP32_ACC = 2.0**-24  # per step of an fp32 accumulation
_ERROR_UNITS = 8


class Skipped(Exception):
    """A check that cannot run here (a peer library that is not installed, a CUDA-only peer in the dry
    run): recorded as skipped, not failed."""


@dataclasses.dataclass
class Result:
    section: str
    name: str
    ok: bool
    detail: str
    seconds: float
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("ok" if self.ok else "**FAIL**")


@dataclasses.dataclass
class Report:
    device: torch.device
    results: list[Result] = dataclasses.field(default_factory=list)

    def check(self, section: str, name: str, fn) -> None:
        """Run ``fn() -> detail``; an exception is a failed check, recorded with its message."""
        t0 = time.perf_counter()
        skipped = False
        try:
            detail, ok = fn(), True
        except Skipped as exc:
            detail, ok, skipped = str(exc), True, True
        except Exception as exc:  # every failure is recorded and reported, none ends the run
            detail, ok = f"{type(exc).__name__}: {exc}".strip()[:500], False
            traceback.print_exc(file=sys.stderr)
        res = Result(section, name, ok, str(detail or ""), time.perf_counter() - t0, skipped)
        self.results.append(res)
        print(f"[{res.status.strip('*')}] {section}: {name} ({res.seconds:.1f} s) {res.detail}", flush=True)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Errors are relative to max |reference|, but at least to this: a gradient that is exactly 0 in exact
# arithmetic (attention over one key: dQ = P (dP - delta) = 0) is rounding noise in any dtype.
_SCALE_FLOOR = 1e-2


def _rel_err(got, ref) -> float:
    ref = ref.double()
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(_SCALE_FLOOR))


def _assert_close(name, got, ref, dtype) -> float:
    err = _rel_err(got, ref)
    bound = _ERROR_UNITS * _ROUNDOFF[dtype]
    if not err <= bound:
        raise AssertionError(f"{name}: relative max error {err:.2e} > {bound:.2e}")
    return err


# --------------------------------------------------------------------------------------------------
# Planted bugs (--plant): each breaks one kernel the way a real bug would; the checks must catch it
# --------------------------------------------------------------------------------------------------


def _plant_onehot_only():
    """The softmax part of dz dropped: the softmax-gradient pass sees lse = +inf, so exp(z - lse) = 0."""
    from vrpo_kernels.masked_linear_ce import triton_path

    real = triton_path._softmax_grad
    return mock.patch.object(
        triton_path,
        "_softmax_grad",
        lambda z, dz, bias, targets, lse, g, v0: real(z, dz, bias, targets, torch.full_like(lse, float("inf")), g, v0),
    )


def _plant_skip_last_chunk():
    """The backward's last vocabulary chunk not computed (d_weight's rows left as allocated, d_hidden
    missing its share) whenever there are several."""
    from vrpo_kernels.masked_linear_ce import triton_path

    real = triton_path.vocab_chunks
    return mock.patch.object(
        triton_path, "vocab_chunks", lambda V, cols: (lambda c: c[:-1] if len(c) > 1 else c)(real(V, cols))
    )


def _plant_stale_lse():
    """The backward reads the log-sum-exp of another row (the previous one)."""
    from vrpo_kernels.masked_linear_ce import triton_path

    real = triton_path.linear_ce_triton_forward

    def forward(h, weight, bias, targets):
        logp, lse = real(h, weight, bias, targets)
        return logp, lse.roll(1)

    return mock.patch.object(triton_path, "linear_ce_triton_forward", forward)


def _plant_no_segment_mask():
    """Attention ignores segment boundaries: every row is one segment for the kernels."""
    from vrpo_kernels.attention import triton_path  # where attention_triton looks _kernel_segments up

    real = triton_path._kernel_segments
    return mock.patch.object(triton_path, "_kernel_segments", lambda seg, B, S, device: real(None, B, S, device))


def _plant_mask_count_off_by_one():
    """The exact-count sampler masks one position fewer than asked (where the count is positive)."""
    from vrpo_kernels.mask_sampling import op  # where sample_masks looks sample_masks_triton up

    real = op.sample_masks_triton

    def sampler(response_mask, counts=None, probs=None, generator=None, config=None):
        if counts is not None:
            counts = (counts - 1).clamp_min(0)
        return real(response_mask, counts, probs, generator, config)

    return mock.patch.object(op, "sample_masks_triton", sampler)


def _plant_zero_column():
    """One chunk-boundary vocabulary row of d_weight zeroed: the last row of the backward's
    second-to-last chunk (V - 1 when there is one chunk), on every path of the op."""
    from vrpo_kernels.masked_linear_ce import op, triton_path

    real = op._StreamedLinearCE.backward

    def backward(ctx, grad_logp):
        grads = real(ctx, grad_logp)
        dw = grads[3]
        if dw is not None:
            h = ctx.saved_tensors[0]
            chunks = triton_path.vocab_chunks(
                dw.shape[0], triton_path.grad_chunk_cols(h.shape[0], dw.shape[0], ctx.max_buffer_bytes)
            )
            dw[chunks[-1][0] - 1 if len(chunks) > 1 else dw.shape[0] - 1] = 0
        return grads

    return mock.patch.object(op._StreamedLinearCE, "backward", staticmethod(backward))


def _plant_int32_offsets():
    """The forward kernel's row and column offsets computed in int32 (``rows * stride`` wraps past 2^31)."""
    from benchmarks import _planted_kernels
    from vrpo_kernels.masked_linear_ce import triton_path

    return mock.patch.object(triton_path, "_logit_tile", _planted_kernels.logit_tile_int32_offsets)


PLANTS = {
    "onehot_only": _plant_onehot_only,
    "zero_column": _plant_zero_column,
    "int32_offsets": _plant_int32_offsets,
    "skip_last_chunk": _plant_skip_last_chunk,
    "stale_lse": _plant_stale_lse,
    "no_segment_mask": _plant_no_segment_mask,
    "mask_count_off_by_one": _plant_mask_count_off_by_one,
}
# The op each plant breaks: a planted run runs that op's correctness checks only (the others cannot fail).
PLANT_OPS = {
    "onehot_only": "masked_linear_ce",
    "zero_column": "masked_linear_ce",
    "int32_offsets": "masked_linear_ce",
    "skip_last_chunk": "masked_linear_ce",
    "stale_lse": "masked_linear_ce",
    "no_segment_mask": "attention",
    "mask_count_off_by_one": "sample_masks",
}


# --------------------------------------------------------------------------------------------------
# 1. preflight
# --------------------------------------------------------------------------------------------------


def preflight(report: Report, dry_run: bool) -> None:
    from vrpo_kernels.dispatch import interpreting, resolve_impl, triton_available

    def interpreter_state():
        if dry_run and not interpreting():
            raise AssertionError("--dry-run needs TRITON_INTERPRET=1 (set before triton is imported)")
        if not dry_run and interpreting():
            raise AssertionError("TRITON_INTERPRET is set: the kernels would run in the CPU interpreter; unset it")
        return f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, triton importable: {triton_available()}"

    def auto_resolves():
        from vrpo_kernels.dispatch import fp32_matmul_precision

        probe = torch.zeros(1, device=report.device, dtype=torch.bfloat16)
        want = "triton"  # the dry run applies CUDA's rules to CPU tensors (emulate_cuda)
        got = {
            op: resolve_impl("auto", probe, op)
            for op in ("masked_linear_ce", "sample_masks", "bidirectional_attention")
        }
        wrong = {op: impl for op, impl in got.items() if impl != want}
        if wrong:
            raise AssertionError(f"impl='auto' resolves to {wrong}, expected {want!r}")
        return f"impl='auto' -> {want} for {sorted(got)}; fp32 matmul precision in force: {fp32_matmul_precision()}"

    report.check("preflight", "interpreter", interpreter_state)
    report.check("preflight", "auto dispatch", auto_resolves)


# --------------------------------------------------------------------------------------------------
# 2. correctness
# --------------------------------------------------------------------------------------------------


# Logit scale of the realistic inputs: logits of the other tokens ~ N(0, SIGMA^2); the predicted token's
# is raised to log(V) + SIGMA^2 / 2, the log-sum-exp of the others, so its probability is about 0.5 and
# the rest spreads with an entropy of about log(V) - SIGMA^2 / 2 nats (a few nats in all).
_LOGIT_SIGMA = 3.0
# Rows of the head drawn from the RNG; further rows are these with their columns permuted and signs
# flipped (still N(0, 1) entries, distinct rows): a 126,464 x 4,096 head costs 8,192 rows of draws, not
# 518M (~9 s on a CPU core). The last head is kept for the next check of the same shape.
_HEAD_BLOCK = 8192
_HEAD_CACHE: dict = {}


def ce_head(V: int, H: int, seed: int, device) -> torch.Tensor:
    """fp32 [V, H] head with N(0, SIGMA^2 / H) entries, generated on ``device`` (reused while the shape
    and seed repeat)."""
    key = (V, H, seed, str(device))
    if key not in _HEAD_CACHE:
        _HEAD_CACHE.clear()
        g = torch.Generator(device=device).manual_seed(seed)
        base = torch.randn(min(V, _HEAD_BLOCK), H, generator=g, device=device)
        W = torch.empty(V, H, device=device)
        W[: base.shape[0]] = base
        for b0 in range(base.shape[0], V, base.shape[0]):
            b1 = min(V, b0 + base.shape[0])
            perm = torch.randperm(H, generator=g, device=device)
            signs = torch.randint(0, 2, (H,), generator=g, device=device) * 2.0 - 1
            torch.mul(base[: b1 - b0, perm], signs, out=W[b0:b1])
        _HEAD_CACHE[key] = W.mul_(_LOGIT_SIGMA / H**0.5)
    return _HEAD_CACHE[key]


def edge_columns(n_sel: int, V: int, max_buffer_bytes=None) -> list[int]:
    """Vocabulary columns at the edges of the backward's chunks and the forward's first tile (0, v0 - 1,
    v0 for each chunk start v0, V - 1): where an off-by-one in a chunk loop loses a column."""
    from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES
    from vrpo_kernels.masked_linear_ce.triton_path import grad_chunk_cols, vocab_chunks

    cols = grad_chunk_cols(n_sel, V, max_buffer_bytes or DEFAULT_MAX_BUFFER_BYTES)
    edges = {0, V - 1}
    for v0, _ in vocab_chunks(V, cols)[1:]:
        edges |= {v0 - 1, v0}
    return sorted(edges)


def ce_inputs(N, n_sel, H, V, dtype, device, bias=False, seed=0, minus_inf_tile=0, edges=()):
    """Masked-CE inputs with a trained head's softmax, generated on ``device``: W ~ N(0, SIGMA^2 / H)
    (:func:`ce_head`), each hidden state N(0, I) plus ``a W[p] / |W[p]|^2`` toward a predicted token p
    (the target for half of the rows, else a random token) with a = log V + SIGMA^2 / 2.
    ``minus_inf_tile`` > 0 puts -inf bias on the first that many columns (targets and predictions avoid
    them); ``edges``: vocabulary columns given as targets to the first selected rows (chunk edges)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    W = ce_head(V, H, seed, device)
    targets = torch.randint(minus_inf_tile, V, (N,), generator=g, device=device)
    rows = torch.randperm(N, generator=g, device=device)[:n_sel].sort().values
    edges = [e for e in edges if e >= minus_inf_tile][: rows.numel()]
    targets[rows[: len(edges)]] = torch.tensor(edges, dtype=torch.long, device=device)
    predicted = torch.where(
        torch.rand(N, generator=g, device=device) < 0.5,
        targets,
        torch.randint(minus_inf_tile, V, (N,), generator=g, device=device),
    )
    raise_to = math.log(V) + _LOGIT_SIGMA**2 / 2
    hidden = torch.randn(N, H, generator=g, device=device)
    wp = W[predicted]
    hidden += raise_to * wp / wp.pow(2).sum(-1, keepdim=True)
    x = dict(
        hidden=hidden.to(dtype),
        weight=W.to(dtype),
        targets=targets,
        row_weight=torch.rand(N, generator=g, device=device) * 4,
        rows=rows,
        cot=torch.randn(N, generator=g, device=device),
        bias=None,
    )
    if bias or minus_inf_tile:
        b = torch.randn(V, generator=g, device=device)
        b[:minus_inf_tile] = float("-inf")
        x["bias"] = b.to(dtype)
    return x


@dataclasses.dataclass
class CERef:
    """float64 reference of a masked-CE call: output [N]; gradients (hidden, weight, bias or None); their
    softmax parts (gradient minus one-hot part); ``abs_dz`` and ``abs_soft``: sum |dz| |operand| and
    sum |g p| |operand| per gradient (the scales of the rounding bound); max |h| |W| of a logit."""

    out: torch.Tensor
    grads: tuple
    soft: tuple
    abs_dz: tuple
    abs_soft: tuple
    max_abs_logit_terms: float


def _zeros_or_none(t):
    return torch.zeros_like(t) if t is not None else None


def ce_reference(x, rows=None, rows_per_chunk=128) -> CERef:
    """float64 output and gradients on ``rows`` (default the selected rows), row chunk by row chunk:
    never [N, V]; holds [V, H] float64 tensors, so for small heads (the large ones: :func:`ce_compare`)."""
    h, W = x["hidden"].double(), x["weight"].double()
    b = x["bias"].double() if x["bias"] is not None else None
    hW_abs, h_abs = W.abs(), h.abs()
    out = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    grads, soft, abs_dz, abs_soft = ([torch.zeros_like(h), torch.zeros_like(W), _zeros_or_none(b)] for _ in range(4))
    rows = x["rows"] if rows is None else rows
    max_terms = 0.0
    for i in range(0, rows.numel(), rows_per_chunk):
        r = rows[i : i + rows_per_chunk]
        z = h[r] @ W.T
        max_terms = max(max_terms, float((h_abs[r] @ hW_abs.T).max()))
        if b is not None:
            z += b
        logp = torch.log_softmax(z, dim=-1)
        wr = x["row_weight"][r].double()
        out[r] = wr * logp.gather(-1, x["targets"][r, None])[:, 0]
        gr = wr * x["cot"][r].double()
        gp = logp.exp_().mul_(-gr[:, None])  # the softmax part of dz
        dz = gp.clone()
        dz[torch.arange(r.numel(), device=h.device), x["targets"][r]] += gr
        for parts, m, w_op, h_op in (
            (grads, dz, W, h[r]),
            (soft, gp, W, h[r]),
            (abs_dz, dz.abs(), hW_abs, h_abs[r]),
            (abs_soft, gp.abs(), hW_abs, h_abs[r]),
        ):
            parts[0][r] = m @ w_op  # d_hidden rows
            parts[1] += m.T @ h_op  # d_weight
            if parts[2] is not None:
                parts[2] += m.sum(0)  # d_bias
    return CERef(out, tuple(grads), tuple(soft), tuple(abs_dz), tuple(abs_soft), max_terms)


def operand_unit(dtype, precision: str) -> float:
    """Relative rounding of each GEMM operand on the way into the tensor cores: 0 for 16-bit operands
    (exact in every mode) and for fp32 in IEEE mode; for fp32 with TF32 allowed 2^-10, TF32's unit
    roundoff with truncation (cuBLAS may truncate; Triton rounds to nearest, 2^-11)."""
    return 2.0**-10 if dtype == torch.float32 and precision == "tf32" else 0.0


def _bound_terms(
    dtype,
    reduction: int,
    H: int,
    max_terms: float,
    interpreter: bool,
    inputs_rounded: bool,
    precision: str,
    probabilistic: bool = False,
) -> tuple[float, float]:
    """(c_dz, c_soft): a gradient's rounding error is at most ``c_dz sum |dz||X| + c_soft sum |g p||X|``
    elementwise (X the other operand). c_dz: u per rounding of the stored ``dz`` (c = 2 under the
    interpreter, whose fp32 -> bf16 cast truncates), one more for a 16-bit d_hidden partial per chunk, the
    result's own rounding, 2 u_in for the GEMM's operands (:func:`operand_unit`) and K 2^-24 for its fp32
    accumulation. c_soft = 2 delta, delta the logits' error on the softmax (forward LSE and backward
    logits, each with H 2^-24 of accumulation and 2 u_in of operand rounding, times max |h||W|; under
    autocast the fp32 masters' rounding to the compute dtype adds 2 u). ``probabilistic``: the logits'
    accumulation term as sqrt(H) 2^-24 instead of the worst case H 2^-24 (rounding errors of random sign
    grow as sqrt(H): Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J.
    Sci. Comput. 2019, Thm 3.1). The per-row check needs it: at H = 4096 the worst case is 64x the
    real error and, on a row whose target has most of the probability, hides a row that is 100% wrong."""
    u, u_in = _UNIT[dtype], operand_unit(dtype, precision)
    acc = 2 * (math.sqrt(H) if probabilistic else H) * _FP32_ACC
    delta = (acc + 4 * u_in + (2 * u if inputs_rounded else 0)) * max_terms
    stored = ((2 if interpreter else 1) + 2 + (1 if inputs_rounded else 0)) * u + 2 * u_in
    return stored + reduction * _FP32_ACC, 2 * delta


def softmax_part_bound(
    dtype,
    reduction: int,
    H: int,
    ref: CERef,
    i: int,
    interpreter: bool,
    inputs_rounded: bool = False,
    precision: str = "ieee",
) -> float:
    """Norm-relative bound on the error of gradient ``i``'s softmax part: ``(c_dz |sum |dz||X|| + c_soft
    |sum |gp||X||) / |softmax part|`` with the coefficients of :func:`_bound_terms`, for the precision in
    force (``precision``: "ieee" or "tf32", :func:`vrpo_kernels.dispatch.fp32_matmul_precision`)."""
    c_dz, c_soft = _bound_terms(dtype, reduction, H, ref.max_abs_logit_terms, interpreter, inputs_rounded, precision)
    scale = c_dz * float(ref.abs_dz[i].norm()) + c_soft * float(ref.abs_soft[i].norm())
    return scale / max(float(ref.soft[i].norm()), 1e-30)


def ce_run(x, impl, grad=True, max_buffer_bytes=None, autocast=False):
    """(out, d_hidden, d_weight, d_bias) of one call; under ``autocast`` the inputs are fp32 masters and
    the op runs in bf16 (torch.autocast), as a mixed-precision training step calls it."""
    from vrpo_kernels import masked_linear_ce

    cast = (lambda t: t.float()) if autocast else (lambda t: t)
    h = cast(x["hidden"]).detach().requires_grad_(grad)
    W = cast(x["weight"]).detach().requires_grad_(grad)
    b = cast(x["bias"]).detach().requires_grad_(grad) if x["bias"] is not None else None
    device = x["hidden"].device.type

    def call():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return masked_linear_ce(
                h, W, x["targets"], x["row_weight"], x["rows"], bias=b, impl=impl, max_buffer_bytes=max_buffer_bytes
            )

    if not grad:
        with torch.no_grad():
            return call(), None, None, None
    out = call()
    leaves = [h, W] + ([b] if b is not None else [])
    grads = torch.autograd.grad((out * x["cot"]).sum(), leaves)
    return out.detach(), grads[0], grads[1], grads[2] if b is not None else None


@dataclasses.dataclass
class _GradStats:
    """One gradient's comparison, accumulated over vocabulary chunks: max |got - ref|, max |ref|, squared
    norms of the error, of the softmax part and of the two bound scales (upper bounds, see
    :func:`ce_compare`), and the worst per-vocabulary-row ratio error / bound (d_weight, d_bias)."""

    max_err: float = 0.0
    max_ref: float = 0.0
    err_sq: float = 0.0
    soft_sq: float = 0.0
    dz_sq: float = 0.0
    gp_sq: float = 0.0
    worst_row: tuple = (0.0, -1, 0.0, 0.0)  # (ratio, row, error, bound)

    def add(self, got, ref, soft, dz_scale, gp_scale, row_bound=None, v0=0):
        """One chunk: ``soft`` the reference's softmax part, ``*_scale`` the bound scales; with
        ``row_bound`` (per vocabulary row), each row's max |got - ref| against it."""
        diff = got.double().sub_(ref).abs_()
        norm = torch.linalg.vector_norm
        self.max_err = max(self.max_err, float(diff.max()))
        self.max_ref = max(self.max_ref, float(norm(ref, float("inf"))))
        self.err_sq += float(norm(diff)) ** 2
        self.soft_sq += float(norm(soft)) ** 2
        self.dz_sq += float(norm(dz_scale)) ** 2
        self.gp_sq += float(norm(gp_scale)) ** 2
        if row_bound is not None:
            err = diff.amax(-1) if diff.dim() > 1 else diff
            ratio = err / row_bound.clamp_min(1e-300)
            i = int(ratio.argmax())
            if float(ratio[i]) > self.worst_row[0]:
                self.worst_row = (float(ratio[i]), v0 + i, float(err[i]), float(row_bound[i]))


def ce_compare(x, got, dtype, *, interpreter: bool, inputs_rounded=False, precision="ieee", cols: int = 2048) -> str:
    """Compare ``got = (out, d_hidden, d_weight, d_bias)`` with float64, streaming the vocabulary in
    chunks of ``cols`` columns (never a [V, H] float64 tensor, so it runs at V = 126,464 on a CPU).

    Three checks per gradient, each with the bound of the arithmetic that runs (:func:`_bound_terms`):
    (1) max |got - ref| / max(max |ref|, 0.01) under 8 units of roundoff; (2) the softmax part (the
    one-hot part is exact in the reference, so the error of the whole is the error of that part) under
    its norm-relative rounding bound; (3) d_weight and d_bias per vocabulary row: the row's max error
    under the row's own elementwise bound, so that one wrong column (a chunk edge) cannot hide among
    126,464 right ones. The bound scales ``sum_i |dz_iv| |h_i|`` are bounded by mat-vecs with row norms
    (``sum_i |dz_iv| ||h_i||``): no extra GEMM, within a few tens of percent for these inputs."""
    rows = x["rows"]
    h = x["hidden"][rows].double()
    n, H = h.shape
    V = x["weight"].shape[0]
    b = x["bias"].double() if x["bias"] is not None else None
    tgt = x["targets"][rows]
    wr = x["row_weight"][rows].double()
    gr = wr * x["cot"][rows].double()
    h_norm, h_inf = h.norm(dim=-1), h.abs().amax(-1)
    chunks = [(v0, min(V, v0 + cols)) for v0 in range(0, V, cols)]

    def w_chunk(v0, v1):
        return x["weight"][v0:v1].double()

    # Pass 1: log-sum-exp, target logit, max |h||W| (bounded by max |h| |W| norms); the logits are kept
    # for pass 2 when they take at most 1 GiB.
    lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=h.device)
    w_norm_max = 0.0
    keep = n * V * 8 <= 1 << 30
    kept = {}
    for v0, v1 in chunks:
        w = w_chunk(v0, v1)
        z = h @ w.T + (b[v0:v1] if b is not None else 0)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        w_norm_max = max(w_norm_max, float(w.norm(dim=-1).max()))
        if keep:
            kept[v0] = z
    z_t = (h * x["weight"][tgt].double()).sum(-1) + (b[tgt] if b is not None else 0)
    max_terms = float(h_norm.max()) * w_norm_max
    ref_out = torch.zeros_like(got[0], dtype=torch.float64)
    ref_out[rows] = wr * (z_t - lse)
    out_err = _assert_close("out", got[0], ref_out, dtype)
    for name, t in zip(("d_hidden", "d_weight", "d_bias"), got[1:]):
        if t is not None and not torch.isfinite(t).all():
            raise AssertionError(f"{name} has non-finite values")
    unselected = torch.ones(got[1].shape[0], dtype=torch.bool, device=got[1].device).index_fill_(0, rows, False)
    if got[1][unselected].any():
        raise AssertionError("d_hidden is not zero on the rows the mask does not select")

    coef = [_bound_terms(dtype, K, H, max_terms, interpreter, inputs_rounded, precision) for K in (V, n, n)]
    row_coef = _bound_terms(dtype, n, H, max_terms, interpreter, inputs_rounded, precision, probabilistic=True)
    stats = [_GradStats(), _GradStats(), _GradStats()]
    dh_ref = torch.zeros(n, H, dtype=torch.float64, device=h.device)
    dh_dz, dh_gp = torch.zeros(n, dtype=torch.float64, device=h.device), torch.zeros_like(dh_ref[:, 0])
    for v0, v1 in chunks:
        w = w_chunk(v0, v1)
        z = kept.pop(v0) if keep else h @ w.T + (b[v0:v1] if b is not None else 0)
        p = torch.exp(z.sub_(lse[:, None]))
        gp = -gr[:, None] * p  # the softmax part of dz
        dz = gp.clone()
        hit = (tgt >= v0) & (tgt < v1)
        dz[hit, tgt[hit] - v0] += gr[hit]
        dh_ref += dz @ w
        w_norm = w.norm(dim=-1)
        dh_dz += dz.abs() @ w_norm
        dh_gp += gp.abs() @ w_norm
        # d_weight rows [v0, v1): reference, softmax part, bound scales (norms per row, and max-abs).
        dw_ref, dw_soft = dz.T @ h, gp.T @ h
        c_dz, c_gp = row_coef
        dz_abs, gp_abs = dz.abs(), gp.abs()
        stats[1].add(
            got[2][v0:v1],
            dw_ref,
            dw_soft,
            dz_abs.T @ h_norm,
            gp_abs.T @ h_norm,
            c_dz * (dz_abs.T @ h_inf) + c_gp * (gp_abs.T @ h_inf),
            v0,
        )
        if got[3] is not None:
            db_dz, db_gp = dz_abs.sum(0), gp_abs.sum(0)
            stats[2].add(got[3][v0:v1], dz.sum(0), gp.sum(0), db_dz, db_gp, c_dz * db_dz + c_gp * db_gp, v0)
    onehot_h = gr[:, None] * x["weight"][tgt].double()
    stats[0].add(got[1][rows], dh_ref, dh_ref - onehot_h, dh_dz, dh_gp)

    errs = [f"out {out_err:.1e}"]
    for i, name in enumerate(("d_hidden", "d_weight", "d_bias")):
        if got[i + 1] is None:
            continue
        st = stats[i]
        if i > 0:  # first: it names the row
            ratio, row, err, rbound = st.worst_row
            if not ratio <= 1:
                raise AssertionError(
                    f"{name} vocabulary row {row}: max error {err:.2e} > its bound {rbound:.2e} ({ratio:.0f}x)"
                )
        rel = st.max_err / max(st.max_ref, _SCALE_FLOOR)
        bound = _ERROR_UNITS * _ROUNDOFF[dtype]
        if not rel <= bound:
            raise AssertionError(f"{name}: relative max error {rel:.2e} > {bound:.2e}")
        c_dz, c_gp = coef[i]
        soft_err = st.err_sq**0.5 / max(st.soft_sq**0.5, 1e-30)
        soft_bound = (c_dz * st.dz_sq**0.5 + c_gp * st.gp_sq**0.5) / max(st.soft_sq**0.5, 1e-30)
        if not soft_err <= soft_bound:
            raise AssertionError(f"{name} softmax part: norm-relative error {soft_err:.2e} > bound {soft_bound:.2e}")
        errs.append(f"{name} {rel:.1e}, softmax part {soft_err:.1e} (bound {soft_bound:.1e})")
        if i > 0:
            errs.append(f"{name} per row: worst {st.worst_row[0]:.2f} of its bound (row {st.worst_row[1]})")
    return ", ".join(errs)


def check_ce_case(x, dtype, max_buffer_bytes=None, autocast=False, impl="triton", precision=None) -> str:
    """One masked-CE call (``impl``) against float64 (:func:`ce_compare`); ``precision``: the fp32 matmul
    precision in force (default: read, :func:`vrpo_kernels.dispatch.fp32_matmul_precision`)."""
    from vrpo_kernels.dispatch import fp32_matmul_precision

    precision = precision or fp32_matmul_precision()
    got = ce_run(x, impl, max_buffer_bytes=max_buffer_bytes, autocast=autocast)
    interpreter = impl == "triton" and x["hidden"].device.type != "cuda"
    detail = ce_compare(x, got, dtype, interpreter=interpreter, inputs_rounded=autocast, precision=precision)
    return detail + (f"; fp32 matmuls: {precision}" if dtype == torch.float32 else "")


class _TF32Torch:
    """``torch``, except that an fp32 x fp32 ``mm`` rounds its operands to TF32 first: cuBLAS's fp32 GEMMs
    with TF32 allowed, emulated on the CPU (installed into the Triton path's backward by
    :func:`cuda_precision`)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def mm(a, b, *args, **kwargs):
        from vrpo_kernels._triton_utils import round_to_tf32

        if a.dtype == b.dtype == torch.float32:
            a, b = round_to_tf32(a), round_to_tf32(b)
        return torch.mm(a, b, *args, **kwargs)


@contextlib.contextmanager
def cuda_precision(precision: str, device):
    """Run the block with torch's fp32 matmul precision set to ``precision`` ("ieee" or "tf32"). On the
    CPU (the dry run) TF32 is emulated as the GPU computes it: the Triton forward's dots round their fp32
    tiles in the interpreter (:func:`vrpo_kernels._triton_utils.upcast_dots`) and the backward's fp32
    GEMMs round their operands (:class:`_TF32Torch`)."""
    from vrpo_kernels._triton_utils import round_to_tf32
    from vrpo_kernels.dispatch import fp32_matmul_precision_set
    from vrpo_kernels.masked_linear_ce import triton_path

    with contextlib.ExitStack() as stack:
        stack.enter_context(fp32_matmul_precision_set(precision))
        if precision == "tf32" and torch.device(device).type != "cuda":
            real_mm = triton_path._mm

            def mm(a, b, out, acc_kind, strategy):
                if a.dtype == b.dtype == out.dtype == torch.float32:
                    a, b = round_to_tf32(a), round_to_tf32(b)
                return real_mm(a, b, out, acc_kind, strategy)

            stack.enter_context(mock.patch.object(triton_path, "torch", _TF32Torch()))
            stack.enter_context(mock.patch.object(triton_path, "_mm", mm))
        yield


def _dtype_variants(dtypes) -> list[tuple[torch.dtype, str]]:
    """(dtype, fp32 matmul precision) pairs: fp32 with TF32 off and on, the 16-bit dtypes once."""
    return [(d, p) for d in dtypes for p in (("ieee", "tf32") if d == torch.float32 else ("ieee",))]


def _dname(dtype, precision="ieee") -> str:
    return str(dtype)[6:] + (f" ({'TF32' if precision == 'tf32' else 'IEEE'})" if dtype == torch.float32 else "")


def correctness_ce(report: Report, plan: Plan, gpu_shapes: bool = False) -> None:
    dev = report.device
    for N, n_sel, H, V in plan.ce_cases:
        edges = edge_columns(n_sel, V)
        for dtype, precision in _dtype_variants(plan.ce_dtypes):
            for bias in (False, True):
                name = f"masked_linear_ce {n_sel} of {N} rows, H={H}, V={V}, {_dname(dtype, precision)}, bias={bias}"

                def case(N=N, n_sel=n_sel, H=H, V=V, dtype=dtype, precision=precision, bias=bias, edges=edges):
                    x = ce_inputs(N, n_sel, H, V, dtype, dev, bias, edges=edges)
                    with cuda_precision(precision, dev):  # the bound reads the precision in force (NGC's
                        return check_ce_case(x, dtype)  # TORCH_ALLOW_TF32_CUBLAS_OVERRIDE makes it TF32)

                report.check("correctness", name, case)
    if gpu_shapes:
        for N, n_sel, H, V, bias in GPU_SHAPES:
            name = f"masked_linear_ce GPU shape, torch path, {n_sel} of {N} rows, H={H}, V={V}, bf16, bias={bias}"

            def case(N=N, n_sel=n_sel, H=H, V=V, bias=bias):
                x = ce_inputs(N, n_sel, H, V, torch.bfloat16, dev, bias, edges=edge_columns(n_sel, V))
                _HEAD_CACHE.clear()  # the fp32 head (2 GB at this shape): not reused, and RAM is scarce
                return check_ce_case(x, torch.bfloat16, impl="torch")

            report.check("correctness", name, case)
    from vrpo_kernels.masked_linear_ce.triton_path import _config

    N, n_sel, H, V = next(c for c in plan.ce_cases if c[1] > 1)
    dtype = plan.bench_ce_dtype
    tile = _config("forward", dtype, dev)["BLOCK_V"]
    report.check(
        "correctness",
        f"masked_linear_ce -inf bias on the first vocabulary tile ({tile} columns), {str(dtype)[6:]}",
        lambda: check_ce_case(ce_inputs(N, n_sel, H, V, dtype, dev, minus_inf_tile=tile), dtype),
    )

    def forward_only():
        N, H, V, compared = plan.ce_forward_only
        x = ce_inputs(N, N, H, V, dtype, dev, seed=1)
        out = ce_run(x, "triton", grad=False)[0]
        rows = torch.linspace(0, N - 1, compared, device=dev).long()
        x = dict(
            x,
            hidden=x["hidden"][rows],
            targets=x["targets"][rows],
            row_weight=x["row_weight"][rows],
            cot=x["cot"][rows],
            rows=torch.arange(compared, device=dev),
        )
        ref = _reference_out(x)
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite output")
        return f"out {_assert_close('out', out[rows], ref, dtype):.1e} on {compared} rows"

    if plan.ce_forward_only:
        report.check(
            "correctness",
            f"masked_linear_ce forward only, {plan.ce_forward_only[0]} rows, no_grad, {str(dtype)[6:]}",
            forward_only,
        )
    for N, n_sel, H, V, budget in plan.ce_multi_chunk:
        name = (
            f"masked_linear_ce multi-chunk backward {n_sel} of {N} rows, H={H}, V={V}, "
            f"max_buffer_bytes={budget or 'default'}, {str(dtype)[6:]}"
        )
        report.check(
            "correctness",
            name,
            lambda N=N, n_sel=n_sel, H=H, V=V, budget=budget: _multi_chunk(N, n_sel, H, V, budget, dtype, dev),
        )
    if plan.ce_offsets_64:
        name = (
            "masked_linear_ce 64-bit offsets: n_sel*H > 2^31, no_grad forward"
            if dev.type == "cuda"
            else "masked_linear_ce 64-bit offsets: forward kernel on rows past 2^31 elements (a strided view)"
        )
        report.check("correctness", name, lambda: _offsets_64(plan, dev))
    if plan.ce_autocast:
        N, n_sel, H, V = plan.ce_autocast
        report.check(
            "correctness",
            f"masked_linear_ce bf16 autocast, fp32 master weights, {n_sel} of {N} rows, V={V}",
            lambda: check_ce_case(
                ce_inputs(N, n_sel, H, V, torch.float32, dev, bias=True, edges=edge_columns(n_sel, V)),
                torch.bfloat16,
                autocast=True,
            ),
        )
    report.check("correctness", "masked_linear_ce on cuda:1", lambda: _second_gpu(dev))
    N, n_sel, H, V, budget = plan.ce_multi_chunk[-1]
    report.check(
        "correctness",
        f"masked_linear_ce backward GEMM forms, each forced, {n_sel} rows, V={V}",
        lambda: _gemm_forms(N, n_sel, H, V, budget, dev),
    )


def _reference_out(x) -> torch.Tensor:
    """float64 output of the selected rows (a vocabulary-chunked log-sum-exp: no [V, H] float64 tensor)."""
    rows = x["rows"]
    h = x["hidden"][rows].double()
    lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64, device=h.device)
    V = x["weight"].shape[0]
    for v0 in range(0, V, 8192):
        lse = torch.logaddexp(lse, torch.logsumexp(h @ x["weight"][v0 : v0 + 8192].double().T, -1))
    z_t = (h * x["weight"][x["targets"][rows]].double()).sum(-1)
    return x["row_weight"][rows].double() * (z_t - lse)


def _gemm_forms(N, n_sel, H, V, budget, dev) -> str:
    """Every GEMM form of vrpo_kernels.masked_linear_ce.gemm that this torch runs on the device, forced in
    turn, at a multi-chunk call against float64; the ones it lacks are listed (the probe refuses them)."""
    from vrpo_kernels.masked_linear_ce import gemm

    dtype = torch.bfloat16
    detected = gemm.detect(dev, dtype)
    x = ce_inputs(N, n_sel, H, V, dtype, dev, seed=4, edges=edge_columns(n_sel, V, budget))
    ran, lacking = [], []
    for kinds, accumulating in ((gemm.PRODUCTS, False), (gemm.ACCUMULATES, True)):
        for kind in kinds:
            try:
                gemm._agrees(kind, accumulating, dev, dtype)
            except Exception as exc:  # this torch lacks the overload: recorded, not a failure
                lacking.append(f"{kind} ({type(exc).__name__})")
                continue
            forced = dataclasses.replace(detected, **{"accumulate" if accumulating else "product": kind})
            with mock.patch.dict(gemm._CHOSEN, {(dev.type, dtype): forced}):
                check_ce_case(x, dtype, budget)
            ran.append(kind)
    return f"detected {detected}; passed: {', '.join(ran)}; not in torch {torch.__version__}: {', '.join(lacking) or 'none'}"  # noqa: E501


def _multi_chunk(N, n_sel, H, V, budget, dtype, dev) -> str:
    from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES
    from vrpo_kernels.masked_linear_ce.triton_path import grad_chunk_cols, vocab_chunks

    chunks = len(vocab_chunks(V, grad_chunk_cols(n_sel, V, budget or DEFAULT_MAX_BUFFER_BYTES)))
    if chunks < 2:
        raise AssertionError(f"the case runs {chunks} chunk: it does not test the accumulation")
    x = ce_inputs(N, n_sel, H, V, dtype, dev, seed=2, edges=edge_columns(n_sel, V, budget))
    return f"{chunks} chunks: " + check_ce_case(x, dtype, budget)


def offsets_cross_2_31(rows: int, H: int) -> bool:
    """True when the last element of a [rows, H] tensor lies past 2^31 - 1, the largest int32 offset."""
    return (rows * H - 1) >= 2**31


def _offsets_64(plan: Plan, dev) -> str:
    """Offsets past 2^31 elements. On the GPU: the op on all rows of a [N, H] bf16 tensor (4 GiB) with
    N H > 2^31. On the CPU (4 GiB of interpreted rows would take hours): the forward kernel on a row-strided
    view whose row offsets pass 2^31, inside an allocation that starts 2^32 elements earlier, so that
    offsets wrapped by int32 arithmetic read (untouched, zero) memory of the same allocation instead of
    faulting. Only the written rows' pages are ever touched."""
    N, H, V, compared = plan.ce_offsets_64
    if dev.type != "cuda":
        return _offsets_64_strided(N, H, V)
    if not offsets_cross_2_31(N, H):
        raise AssertionError(f"{N} x {H} elements end at or before 2^31: the case does not pass 32-bit offsets")
    x = ce_inputs(compared, compared, H, V, torch.bfloat16, dev, seed=3)
    # The compared rows at the end of a [N, H] tensor, past 2^31 elements; the rest is zeros.
    hidden = torch.zeros(N, H, dtype=torch.bfloat16, device=dev)
    hidden[N - compared :] = x["hidden"]
    targets = torch.zeros(N, dtype=torch.long, device=dev)
    targets[N - compared :] = x["targets"]
    rows = torch.arange(N, device=dev)
    from vrpo_kernels import masked_linear_ce

    with torch.no_grad():
        out = masked_linear_ce(hidden, x["weight"], targets, torch.ones(N, device=dev), rows, impl="triton")
    x["row_weight"] = torch.ones(compared, device=dev)
    ref = _reference_out(x)
    return f"out {_assert_close('out', out[N - compared :], ref, torch.bfloat16):.1e} on the last {compared} rows"


_STRIDE_2_26 = 2**26


def _offsets_64_strided(n, H, V) -> str:
    from vrpo_kernels.masked_linear_ce.triton_path import linear_ce_triton_forward

    stride = _STRIDE_2_26
    if not offsets_cross_2_31(n - 1, stride):
        raise AssertionError(f"{n} rows of stride {stride} end before 2^31: the case does not pass 32-bit offsets")
    x = ce_inputs(n, n, H, V, torch.bfloat16, "cpu", seed=3)
    lead = 2**32  # int32 wraps by 2^32 elements: a wrapped offset lands in the allocation's lead
    storage = torch.empty(lead + (n - 1) * stride + H, dtype=torch.bfloat16)  # virtual; pages untouched
    view = storage[lead:].as_strided((n, H), (stride, 1))
    view.copy_(x["hidden"])
    logp, _ = linear_ce_triton_forward(view, x["weight"], None, x["targets"])
    ref = _reference_out(dict(x, row_weight=torch.ones(n)))
    last = (n - 1) * stride + H - 1
    return f"out {_assert_close('out', logp, ref, torch.bfloat16):.1e} on {n} rows, last element offset {last:,} > 2^31"


def _second_gpu(dev) -> str:
    if dev.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skipped("no second GPU")
    x = ce_inputs(37, 37, 4095, 50257, torch.bfloat16, torch.device("cuda:1"), bias=True)
    return check_ce_case(x, torch.bfloat16)


def attn_inputs(B, S, Hq, Hkv, D, dtype, device, seed=0):
    """q/k/v as [B, H, S, D] views of [B, S, H, D] (as transformers passes them), drawn on ``device``,
    packed segments with a padding tail."""
    from benchmarks.kernels import packed_segments

    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, S, h, D, generator=g, device=device).to(dtype).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    seg = packed_segments(B, S, 1, max(1, (S * 2) // 5), seed=seed).to(device)
    return q, k, v, seg


def check_attention_case(B, S, Hq, Hkv, D, dtype, device) -> str:
    from vrpo_kernels.attention import attention_reference, bidirectional_attention

    q, k, v, seg = attn_inputs(B, S, Hq, Hkv, D, dtype, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = bidirectional_attention(*leaves, seg, impl="triton")
    ref = attention_reference(*leaves, seg)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, leaves, cot.to(dtype))
    want = torch.autograd.grad(ref, leaves, cot)
    errs = [f"out {_assert_close('out', out.detach(), ref.detach(), dtype):.1e}"]
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        errs.append(f"{name} {_assert_close(name, a, r, dtype):.1e}")
    if not out.transpose(1, 2).is_contiguous():
        raise AssertionError("the output is not a view of a [B, S, H, D] buffer")
    return ", ".join(errs)


def correctness_attention(report: Report, plan: Plan) -> None:
    B, Hq = plan.attn_batch_heads
    for D, group, S, dtype in plan.attn_cases:
        name = f"attention D={D}, GQA {group}, S={S}, B={B}, {Hq} heads, {str(dtype)[6:]}"
        report.check(
            "correctness",
            name,
            lambda D=D, group=group, S=S, dtype=dtype: check_attention_case(
                B, S, Hq, Hq // group, D, dtype, report.device
            ),
        )


def check_mask_counts(L, device) -> str:
    from vrpo_kernels import sample_masks

    g = torch.Generator(device=device).manual_seed(L)
    resp = torch.ones(4, L, dtype=torch.bool, device=device)
    resp[1:, : L // 3] = False
    lengths = resp.sum(-1, keepdim=True)
    counts = (torch.rand(4, 8, generator=g, device=device) * (lengths + 1)).long().clamp(max=lengths)
    counts[:, 0], counts[:, 1] = 0, lengths[:, 0]
    masked = sample_masks(resp, counts=counts, generator=g, impl="triton")
    if not torch.equal(masked.sum(-1), counts):
        raise AssertionError(f"counts differ: {(masked.sum(-1) != counts).sum().item()} of {counts.numel()}")
    if (masked & ~resp[:, None, :]).any():
        raise AssertionError("a position outside the response was masked")
    probs = torch.full((4, 8), 0.3, device=device)
    bern = sample_masks(resp, probs=probs, generator=g, impl="triton")
    trials = int(lengths.sum()) * 8
    z = (bern.sum().item() - 0.3 * trials) / (0.21 * trials) ** 0.5
    if abs(z) > 5:
        raise AssertionError(f"t-Bernoulli frequency off by {z:.1f} sigma")
    return f"exact counts on {counts.numel()} samples; Bernoulli(0.3) z = {z:+.2f}"


def correctness_masks(report: Report, plan: Plan) -> None:
    for L in plan.mask_lengths:
        report.check("correctness", f"sample_masks L={L}", lambda: check_mask_counts(L, report.device))


# --------------------------------------------------------------------------------------------------
# 3. determinism
# --------------------------------------------------------------------------------------------------


def _same_twice(run) -> str:
    a, b = run(), run()
    for i, (x, y) in enumerate(zip(a, b)):
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            raise AssertionError(f"output {i} differs between two runs")
    return f"{len(a)} outputs bitwise equal"


def determinism(report: Report, plan: Plan) -> None:
    dev = report.device
    N, H, V = plan.bench_ce
    x = ce_inputs(N, N, H, V, plan.bench_ce_dtype, dev, bias=True)
    report.check(
        "determinism",
        f"masked_linear_ce {N}x{H}x{V} {str(plan.bench_ce_dtype)[6:]} fwd+bwd",
        lambda: _same_twice(lambda: ce_run(x, "triton")),
    )
    B, S, Hh, D = plan.bench_attn
    q, k, v, seg = attn_inputs(B, S, Hh, Hh, D, torch.bfloat16, dev)

    def attention():
        from vrpo_kernels import bidirectional_attention

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = bidirectional_attention(*leaves, seg, impl="triton")
        return (out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    report.check("determinism", f"attention {B}x{S}, {Hh} heads, D={D} bf16 fwd+bwd", lambda: _same_twice(attention))

    def masks():
        from vrpo_kernels import sample_masks

        L = plan.mask_lengths[-1]
        resp = torch.ones(4, L, dtype=torch.bool, device=dev)
        counts = torch.arange(4, device=dev)[:, None].expand(4, 2) * (L // 4)
        return (sample_masks(resp, counts=counts, generator=torch.Generator(device=dev).manual_seed(3), impl="triton"),)

    report.check("determinism", "sample_masks same seed", lambda: _same_twice(masks))


# --------------------------------------------------------------------------------------------------
# 4. training steps
# --------------------------------------------------------------------------------------------------


def build_step_trainer(
    spec: dict, pairs: int, n_t: int, workdir: str, dtype=torch.bfloat16, seed: int = 0, device=None
):
    """A ``VRPOTrainer`` on the toy preference task with a random LLaDA-architecture model ``spec`` in
    ``dtype`` (bf16: what a user trains on a GPU; the Triton attention refuses fp32 on CUDA), built on
    ``device`` (default: where accelerate puts it; a 1.1B model initialised on the CPU takes minutes), and
    every kernel on ``impl="auto"``, as a user's run: the fused head, vrpo_triton attention."""
    from vrpo.models import build_tiny_llada, build_tiny_tokenizer
    from vrpo.tasks.sort import SORT_TASK
    from vrpo.training import VRPOTrainer, loading
    from vrpo.training.config import VRPOConfig

    cfg = VRPOConfig(
        task="sort",
        output_dir=workdir,
        overwrite_output_dir=True,
        report_to="none",
        num_samples=0,
        save_steps=0,
        seed=seed,
        eval_size=0,
        per_device_train_batch_size=pairs,
        n_t=n_t,
        n_yt=1,
        max_steps=10,
        fused_head=True,
        kernel_impl="auto",
        attn_implementation="vrpo_triton",
    ).resolved(SORT_TASK.presets)
    tokenizer = build_tiny_tokenizer(vocab_size=spec["vocab_size"])
    train_pairs, _, _ = loading.load_pairs(cfg, tokenizer, SORT_TASK)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_tiny_llada(seed=seed, attn_implementation="vrpo_triton", dtype=dtype, **spec)
    return VRPOTrainer(cfg, model=model, tokenizer=tokenizer, train_pairs=train_pairs, eval_pairs=None, task=SORT_TASK)


def _policy_parameters(trainer):
    return trainer.accelerator.unwrap_model(trainer.policy_elbo).parameters()


@contextlib.contextmanager
def _policy_shapes(trainer):
    """Record the [B, L] of every policy forward inside the block (a hook on the input embedding: the fused
    head calls the backbone, not the ``ForCausalLM`` wrapper)."""
    shapes = []
    model = trainer.accelerator.unwrap_model(trainer.policy_elbo).model
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape)) if args and torch.is_tensor(args[0]) else None
    )
    try:
        yield shapes
    finally:
        handle.remove()


def llada_step_memory(spec: dict = LLADA_1B, pairs: int = 2, n_t: int = 8, dtype=torch.bfloat16) -> dict:
    """Peak CUDA memory of one VRPO training step of a random LLaDA-architecture model (``spec``, default
    about 1.1B parameters in bf16, built on the GPU): a warm-up step (optimizer state, lazy
    initialisation), then ``torch.cuda.max_memory_allocated`` over a second step. Returns parameters, step
    seconds, the allocated bytes before the step, the peak, the peak minus the before, and vrpo.plan's
    peak for the rows the step actually ran (:func:`planned_peak_bytes`)."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_step_trainer(spec, pairs, n_t, workdir, dtype=dtype, device=torch.device("cuda"))
        params = sum(p.numel() for p in _policy_parameters(trainer))
        applied, metrics, _ = trainer.train_step(0)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with _policy_shapes(trainer) as shapes:
            applied2, metrics, _ = trainer.train_step(1)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        planned = planned_peak_bytes(trainer, shapes)
    if not (applied and applied2):
        raise RuntimeError(f"train_step was skipped (non-finite loss or gradient): {metrics}")
    return dict(
        params=params,
        seconds=seconds,
        before_bytes=before,
        peak_bytes=peak,
        step_bytes=peak - before,
        planned_bytes=planned,
    )


def planned_peak_bytes(trainer, shapes=()) -> int:
    """``python -m vrpo.plan``'s per-GPU peak for the trainer's run and model (one GPU, no sharding). The
    plan assumes rows of ``max_length`` tokens (its upper bound for a run); the check gives it the rows the
    step ran (``shapes``: the policy forwards' [B, L]), as ``max_length`` = the step's largest micro-batch
    in tokens over the plan's sequences per micro-batch, so that it models what the step does."""
    from vrpo.plan import peak_memory_bytes, tokens_per_micro_batch

    cfg = trainer.config
    if shapes:
        tokens = max(b * s for b, s in shapes)
        per_token = tokens_per_micro_batch(cfg) // cfg.max_length
        cfg = dataclasses.replace(cfg, max_length=-(-tokens // per_token))
    return peak_memory_bytes(cfg, model=trainer.accelerator.unwrap_model(trainer.policy_elbo).model)


# The plan is an upper bound on the peak, and tight: at most this fraction above it.
PLAN_SLACK = 0.10


def check_planned_peak(peak: int, planned: int) -> str:
    """The measured peak must not exceed the plan (an upper bound), and the plan must not exceed the
    peak by more than :data:`PLAN_SLACK` (a loose bound would hide a leak as large as the slack)."""
    if peak > planned:
        raise AssertionError(
            f"max_memory_allocated {peak / 2**30:.2f} GiB exceeds vrpo.plan's upper bound {planned / 2**30:.2f} GiB"
        )
    if planned > (1 + PLAN_SLACK) * peak:
        raise AssertionError(
            f"vrpo.plan's {planned / 2**30:.2f} GiB is more than {PLAN_SLACK:.0%} above the "
            f"measured {peak / 2**30:.2f} GiB: the plan is not tight"
        )
    return f"plan {planned / 2**30:.2f} GiB >= peak {peak / 2**30:.2f} GiB, {planned / peak - 1:+.1%}"


def training_steps(report: Report, plan: Plan) -> None:
    for name, spec, pairs, n_t, dtype in plan.step_models:

        def step(spec=spec, pairs=pairs, n_t=n_t, dtype=dtype):
            if report.device.type == "cuda" and spec is LLADA_1B:
                m = llada_step_memory(spec, pairs, n_t, dtype)
                verdict = check_planned_peak(m["peak_bytes"], m["planned_bytes"])
                return (
                    f"{m['params'] / 1e9:.2f}B params, step {m['seconds']:.2f} s, max_memory_allocated "
                    f"{m['peak_bytes'] / 2**30:.2f} GiB (step adds {m['step_bytes'] / 2**30:.2f} GiB); {verdict}"
                )
            with tempfile.TemporaryDirectory() as workdir:
                trainer = build_step_trainer(spec, pairs, n_t, workdir, dtype=dtype)
                params = list(_policy_parameters(trainer))
                if report.device.type == "cuda" and params[0].device.type != "cuda":
                    raise AssertionError(f"the trainer put the model on {params[0].device}")
                if params[0].dtype != dtype:
                    raise AssertionError(f"the model runs in {params[0].dtype}, not {dtype}")
                with _policy_shapes(trainer) as shapes:
                    applied, metrics, tokens = trainer.train_step(0)
                planned = planned_peak_bytes(trainer, shapes)
            if not applied:
                raise AssertionError(f"the step was skipped (non-finite loss or gradient): {metrics}")
            return (
                f"applied, {tokens} tokens in rows {sorted(set(shapes))}, VRPO loss "
                f"{float(metrics['loss/vrpo']):.4f}, grad norm {metrics['grad_norm']:.3g}; vrpo.plan's peak "
                f"{planned / 2**20:.1f} MiB"
            )

        report.check("training step", name, step)
    report.check(
        "training step",
        f"README quick start: python -m vrpo.train --max_steps {plan.quickstart_steps}",
        lambda: quickstart(plan.quickstart_steps, report.device),
    )
    if report.device.type != "cuda":

        def memory_check():
            raise Skipped(
                "the 1.1B step's max_memory_allocated against vrpo.plan: CUDA's allocator only (the "
                "comparison, check_planned_peak, and the plan's AdamW term are unit-tested)"
            )

        report.check("training step", "LLaDA-architecture 1.1B, bf16, peak memory against vrpo.plan", memory_check)


# The README's quick start, with --max_steps added. Its greedy generations on 1024 test prompts, before and
# after training, are most of its time: about 2 minutes on a 2-core CPU, seconds on a GPU.
QUICKSTART = ("-m", "vrpo.train")


def quickstart(max_steps: int, device) -> str:
    """The README's quick start as a user runs it (a subprocess of :data:`QUICKSTART`, in a temporary
    output directory); the dry run with ``--max_steps 1`` (a CPU runs a step in seconds, the demo's 20 in
    minutes), the GPU run with 20."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [
            sys.executable,
            *QUICKSTART,
            "--max_steps",
            str(max_steps),
            "--output_dir",
            os.path.join(workdir, "run"),
            "--report_to",
            "none",
        ]
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        if device.type == "cuda":
            env.pop("TRITON_INTERPRET", None)
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)
        if run.returncode != 0:
            raise AssertionError(f"exit {run.returncode}: {(run.stderr or run.stdout).strip()[-400:]}")
        last = (run.stdout.strip().splitlines() or [""])[0][:160]
        return f"python {' '.join(cmd[1:5])}: exit 0 in {time.perf_counter() - t0:.0f} s; {last}"


# --------------------------------------------------------------------------------------------------
# 5. timings
# --------------------------------------------------------------------------------------------------


def bench_ms(fn, device) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _agrees_with_peer(x, make_loss, dev, why_not=None) -> str:
    """A peer's log-probs and gradients (hidden, weight) against ours on the selected rows, relative to
    max |ours|: within twice the bf16 bound of one implementation against float64 (2 x 8 x 2^-8)."""
    if why_not:
        raise Skipped(why_not)
    try:
        loss_fn = make_loss()
    except ImportError as exc:
        raise Skipped(f"not installed ({exc}); pip install '.[bench]'") from exc
    peer = _peer_values(x, loss_fn)
    ours = ce_run(x, "triton")
    rows = x["rows"]
    errs = []
    pairs = (("out", peer[0], ours[0][rows]), ("d_hidden", peer[1], ours[1][rows]), ("d_weight", peer[2], ours[2]))
    for name, a, b in pairs:
        err = _rel_err(a, b)
        if not err <= 2 * _ERROR_UNITS * _ROUNDOFF[torch.bfloat16]:
            raise AssertionError(f"{name}: relative max difference {err:.2e}")
        errs.append(f"{name} {err:.1e}")
    return ", ".join(errs)


def _peer_values(x, loss_fn):
    """(weighted log-probs [n_sel], d_hidden [n_sel, H], d_weight) of a peer's per-row loss on the
    selected rows (peers take gathered rows), with the same row weights and cotangent as ours."""
    h = x["hidden"][x["rows"]].detach().requires_grad_()
    W = x["weight"].detach().requires_grad_()
    out = loss_fn(h, W, x["targets"][x["rows"]]) * x["row_weight"][x["rows"]]
    dh, dW = torch.autograd.grad((out * x["cot"][x["rows"]]).sum(), [h, W])
    return out.detach(), dh, dW


def _gathered_ce(x, loss_fn):
    """fwd + bwd of a peer's per-row loss on the selected rows, as a timed callable."""
    return lambda: _peer_values(x, loss_fn)


def cce_loss(filter_eps="default"):
    """CCE's per-row log-prob function (its default ``filter_eps`` unless given)."""
    from cut_cross_entropy import linear_cross_entropy

    kw = {} if filter_eps == "default" else {"filter_eps": filter_eps}
    return lambda h, W, t: -linear_cross_entropy(h, W, t, reduction="none", impl="cce", **kw).float()


def liger_loss():
    """Liger's fused linear CE, per row, as a log-prob function."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, W, t: -loss(W, h, t).float()


def eager_masked_ce(x):
    """Masked CE as plain torch computes it (gather the selected rows, logits, log_softmax, pick the
    target), fwd + bwd: the baseline the fused kernel exists to beat; ``torch.compile`` of it is the other."""
    rows, tgt = x["rows"], x["targets"][x["rows"]]
    wr, cot = x["row_weight"][rows], x["cot"][rows]

    def loss(h, W):
        logp = torch.log_softmax((h[rows] @ W.T).float(), -1).gather(-1, tgt[:, None])[:, 0]
        return (logp * wr * cot).sum()

    return loss


def timings(report: Report, plan: Plan) -> dict:
    """Times our kernels and what a user would otherwise run (eager torch and ``torch.compile`` for masked
    CE, SDPA and flash-attn for attention; CCE and Liger with the peers); returns ms per (op, impl)."""
    from vrpo_kernels.attention import bidirectional_attention

    dev = report.device
    measured = {}

    def timed(op, impl, make, why_not=None):
        def run():
            if why_not:
                raise Skipped(why_not)
            try:
                fn = make()
            except ImportError as exc:
                raise Skipped(f"not installed ({exc}); pip install '.[bench]'") from exc
            ms = bench_ms(fn, dev)
            measured[(op, impl)] = ms
            return f"{ms:.3f} ms"

        report.check("timing", f"{op}: {impl}", run)

    cuda_only = None if dev.type == "cuda" else "a CUDA kernel: not run in the dry run"
    peers = cuda_only or (None if plan.peers else "a peer: full check only (not --quick)")
    N, H, V = plan.bench_ce
    x = ce_inputs(N, N, H, V, plan.bench_ce_dtype, dev)

    def grads_of(loss):
        def run():
            h, W = (x[k].detach().requires_grad_() for k in ("hidden", "weight"))
            torch.autograd.grad(loss(h, W), [h, W])

        return run

    timed("masked_ce", "vrpo triton", lambda: lambda: ce_run(x, "triton"))
    timed(
        "masked_ce",
        "eager torch",
        lambda: grads_of(eager_masked_ce(x)),
        None if plan.peers or dev.type != "cuda" else "full check only (not --quick)",
    )
    timed(
        "masked_ce",
        "torch.compile (eager torch)",
        lambda: grads_of(torch.compile(eager_masked_ce(x))),
        peers if dev.type == "cuda" else "inductor compiles C++ for a CPU timing that says nothing of a GPU",
    )
    timed("masked_ce", "CCE (impl='cce')", lambda: _gathered_ce(x, cce_loss()), peers)
    timed("masked_ce", "CCE (impl='cce', filter_eps=None)", lambda: _gathered_ce(x, cce_loss(None)), peers)
    timed("masked_ce", "Liger fused linear CE", lambda: _gathered_ce(x, liger_loss()), peers)
    for name, make in (("CCE (filter_eps=None)", lambda: cce_loss(None)), ("Liger fused linear CE", liger_loss)):
        report.check(
            "correctness", f"masked_ce agrees with {name}", lambda make=make: _agrees_with_peer(x, make, dev, peers)
        )

    B, S, Hh, D = plan.bench_attn
    q, k, v, _ = attn_inputs(B, S, Hh, Hh, D, torch.bfloat16, dev)
    one_segment = torch.zeros(B, S, dtype=torch.long, device=dev)

    def attention_fn(forward):
        def run():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = forward(*leaves)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        return run

    timed(
        "attention",
        "vrpo triton",
        lambda: attention_fn(lambda a, b, c: bidirectional_attention(a, b, c, one_segment, impl="triton")),
    )
    packed = attn_inputs(B, S, Hh, Hh, D, torch.bfloat16, dev)[3]
    timed(
        "attention",
        "vrpo triton, packed segments",
        lambda: attention_fn(lambda a, b, c: bidirectional_attention(a, b, c, packed, impl="triton")),
        None if plan.peers or dev.type != "cuda" else "full check only (not --quick)",
    )
    timed("attention", "SDPA", lambda: attention_fn(torch.nn.functional.scaled_dot_product_attention))

    def flash():
        from benchmarks.kernels import flash_attn_forward

        pack, forward, _ = flash_attn_forward(q, k, v, one_segment)
        pq, pk, pv = (pack(t).contiguous() for t in (q, k, v))

        def run():
            leaves = [t.detach().requires_grad_() for t in (pq, pk, pv)]
            out = forward(*leaves)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        return run

    timed("attention", "flash-attn varlen", flash, peers)
    return measured


# --------------------------------------------------------------------------------------------------
# The time budget, estimated without a GPU (printed by --estimate; tests hold the plans to it)
# --------------------------------------------------------------------------------------------------

#: Seconds per Triton compile for sm_90: `python -m tools.aot_report` compiled the 44 configurations of
#: the kernels' aot_specs() (Triton to PTX, ptxas -v) in 61 s wall on a 2-core shared x86 CPU, 1.4 s each.
COMPILE_S = 1.4
#: Fixed costs on the GPU host (assumed, not measured): interpreter start, imports and CUDA context; each
#: trainer built (accelerate, tokenizer, toy pairs); the quick start subprocess (start-up, 20 tiny steps,
#: 2 x 1024 greedy generations of the 124k-parameter model: 97-105 s on a CPU per the README, of which the
#: steps and generations are GEMMs of a few MFLOP each); torch.compile of the eager masked CE (inductor).
STARTUP_S, TRAINER_S, QUICKSTART_S, TORCH_COMPILE_S = 15.0, 5.0, 40.0, 45.0
#: Sustained fractions of the H100's peaks for the checks' own arithmetic: float64 references (67 TFLOP/s
#: tensor-core fp64) at half, our kernels at the cost model's 35%.
_FP64_PEAK, _FP64_EFF, _KERNEL_EFF = 67e12, 0.5, 0.35
#: triton.testing.do_bench per call: 25 ms warm-up + 100 ms of repetitions, plus its estimate runs.
_BENCH_S = 0.2


def _spec(x: int) -> str:
    """Triton's specialisation of an int argument: 1, divisible by 16, or other (one compile each)."""
    return "1" if x == 1 else "16" if x % 16 == 0 else "n"


def estimated_compiles(plan: Plan) -> dict:
    """Distinct Triton compilations of a run of ``plan``, per op: a kernel compiles once per constexpr set
    and per specialisation of its int arguments (:func:`_spec`)."""
    from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES
    from vrpo_kernels.masked_linear_ce.triton_path import grad_chunk_cols

    ce = set()
    cases = [
        (N, n, H, V, None, d, p, b)
        for N, n, H, V in plan.ce_cases
        for d, p in _dtype_variants(plan.ce_dtypes)
        for b in (False, True)
    ]
    cases += [(N, n, H, V, budget, plan.bench_ce_dtype, "ieee", False) for N, n, H, V, budget in plan.ce_multi_chunk]
    for N, n, H, V, budget, d, p, b in cases:
        ce.add(("fwd", d, p, b, _spec(n), _spec(H), _spec(V)))
        C = grad_chunk_cols(n, V, budget or DEFAULT_MAX_BUFFER_BYTES)
        ce.add(("grad", d, b, _spec(C), _spec(2 * C)))
    attn = {(dt, D, _spec(S), g == 1) for D, g, S, dt in plan.attn_cases}
    steps = len(plan.step_models)
    return {
        "masked_linear_ce": len(ce) + 2 * bool(plan.ce_forward_only or plan.ce_offsets_64),
        "attention": 4 * len(attn) + 4,  # fwd, delta, dkdv, dq; + the forward-only timing/determinism shape
        "sample_masks": 2 * len({_spec(L) for L in plan.mask_lengths}),
        "training step": 8 * steps + 2,
    }  # per model: attention 4, head 2, masks 2; the quick start 2


def estimated_seconds(plan: Plan) -> dict:
    """Seconds of a run of ``plan`` on an H100 with a cold Triton cache, per section and in total: compiles x
    :data:`COMPILE_S`, plus the arithmetic of the kernels and float64 references at the rates above, plus
    the fixed costs. An estimate to size the plans; the GPU run prints the real figures per section."""
    from vrpo_kernels.gpus import GPUS

    gpu = GPUS["h100"]
    compiles = estimated_compiles(plan)
    ce_flops = sum(8 * n * H * V * len(_dtype_variants(plan.ce_dtypes)) * 2 for _, n, H, V in plan.ce_cases)
    ce_flops += sum(8 * n * H * V for _, n, H, V, _ in plan.ce_multi_chunk) * (1 + 2)  # + the GEMM forms, forced
    ref_flops = ce_flops  # the float64 reference does the same four products
    if plan.ce_forward_only:
        ce_flops += 2 * plan.ce_forward_only[0] * plan.ce_forward_only[1] * plan.ce_forward_only[2]
    if plan.ce_offsets_64:
        ce_flops += 2 * plan.ce_offsets_64[0] * plan.ce_offsets_64[1] * plan.ce_offsets_64[2]
    compute = ce_flops / (gpu.bf16_flops * _KERNEL_EFF) + ref_flops / (_FP64_PEAK * _FP64_EFF)
    B, Hq = plan.attn_batch_heads
    attn_ref = sum(2 * 7 * B * Hq * S * S * D for D, _, S, _ in plan.attn_cases)  # float64 reference
    out = {
        "start-up": STARTUP_S,
        "correctness": (compiles["masked_linear_ce"] + compiles["attention"] + compiles["sample_masks"]) * COMPILE_S
        + compute
        + attn_ref / (_FP64_PEAK * _FP64_EFF),
        "training step": compiles["training step"] * COMPILE_S
        + TRAINER_S * len(plan.step_models)
        + QUICKSTART_S
        + (30.0 if plan.memory_check else 0.0),  # the 1.1B model: built on the GPU, two steps
        "timing": _BENCH_S * (9 if plan.peers else 4) + (TORCH_COMPILE_S if plan.peers else 0.0),
    }
    out["total"] = sum(out.values())
    return out


def predictions(plan: Plan, device) -> tuple[str, object]:
    from tools import roofline
    from vrpo_kernels.gpus import GPUS

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpu = GPUS["h200" if "H200" in name else "a100" if "A100" in name else "h100"]
    # Priced in the GEMM forms the backward actually uses on this device (the dry run: CUDA's, by version).
    strategy = None
    if device.type == "cuda":
        from vrpo_kernels.masked_linear_ce import gemm

        strategy = gemm.strategy_for(device, plan.bench_ce_dtype)
    return gpu.name, roofline.predict(gpu, plan.bench_ce, plan.bench_attn, strategy=strategy)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def environment(device) -> list[str]:
    import triton

    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
            f"capability {props.major}.{props.minor}"
        )
        lines.append(f"- CUDA {torch.version.cuda}, driver {_driver_version()}")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}), Triton interpreter (dry run)")
    return lines


def _driver_version() -> str:
    try:
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return run.stdout.strip().splitlines()[0] if run.returncode == 0 and run.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"


def markdown(
    report: Report,
    plan: Plan,
    measured: dict,
    pred,
    gpu_name: str,
    seconds: float,
    dry_run: bool,
    plant: str | None = None,
) -> str:
    out = [
        "# GPU check"
        + (" (dry run on the CPU: interpreter, tiny shapes)" if dry_run else "")
        + (f", planted bug {plant!r}" if plant else ""),
        "",
    ]
    out += environment(report.device)
    skipped = sum(r.skipped for r in report.results)
    out += [
        f"- {len(report.results) - len(report.failed) - skipped} of {len(report.results)} checks passed, "
        f"{skipped} skipped, in {seconds:.0f} s",
        "",
    ]
    out += ["| section | check | result | s | detail |", "|---|---|---|---|---|"]
    for r in report.results:
        out.append(f"| {r.section} | {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |")
    out += ["", "Elapsed per section: " + ", ".join(f"{k} {v:.0f} s" for k, v in section_seconds(report).items()), ""]
    if pred is None:  # a planted-bug run: correctness only
        return "\n".join(out + [""])
    out += timing_table(plan, measured, pred, gpu_name)
    return "\n".join(out)


def timing_table(plan: Plan, measured: dict, pred, gpu_name: str) -> list[str]:
    """Measured times and measured ratios (each implementation over ours, measured against measured);
    the cost model's prediction for our kernels in a column of its own, never a divisor."""
    N, H, V = plan.bench_ce
    B, S, Hh, D = plan.bench_attn
    out = [
        "",
        f"## Timings, and the cost model's predictions ({gpu_name} peaks; `python -m tools.roofline`)",
        "",
        f"masked CE fwd+bwd at N={N}, H={H}, V={V} bf16; attention fwd+bwd at {B} x {S}, {Hh} heads, D={D} bf16, "
        "one sample per row. Median ms of `triton.testing.do_bench` (wall clock in the dry run). "
        "'x ours' is this implementation's measured time over vrpo triton's measured time (above 1: ours is "
        "faster). The predictions are ours only: expected (an estimate) and ideal (a floor).",
        "",
        "| op | implementation | measured ms | x ours (measured) | predicted ms | expected ms | ideal ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (op, impl), ms in measured.items():
        ours = measured.get((op, "vrpo triton"))
        ratio = f"{ms / ours:.2f}" if ours else "-"
        if impl == "vrpo triton":
            p, e, ideal = (
                (pred.masked_ce_s, pred.masked_ce_expected_s, pred.masked_ce_ideal_s)
                if op == "masked_ce"
                else (pred.attention_s, pred.attention_expected_s, pred.attention_ideal_s)
            )
            cells = f"{p * 1e3:.3f} | {e * 1e3:.3f} | {ideal * 1e3:.3f}"
        else:
            cells = "- | - | -"
        out.append(f"| {op} | {impl} | {ms:.3f} | {ratio} | {cells} |")
    out += ["", pred.expected_summary(), pred.summary(), ""]
    return out


def section_seconds(report: Report) -> dict:
    """Seconds spent per section, in the order the sections ran."""
    totals: dict = {}
    for r in report.results:
        totals[r.section] = totals.get(r.section, 0.0) + r.seconds
    return totals


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``: a
    reader sees the old file or the new one, never a half-written one."""
    fd, tmp = tempfile.mkstemp(prefix=".gpu_check-", suffix=".md", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(
    dry_run: bool = False,
    out_dir: str | None = None,
    plant: str | None = None,
    quick: bool = False,
    gpu_shapes: bool = False,
) -> tuple[Report, str]:
    """Run every section (with a ``plant``: the correctness checks of the op it breaks, under it); write
    ``gpu_check.md`` into ``out_dir``. Returns (report, path).

    The dry run is CUDA-faithful: the kernels run on CPU tensors in the interpreter under CUDA's rules
    (:func:`vrpo_kernels.dispatch.emulate_cuda`: dispatch and dtype policy), fp32 with TF32 off and on
    (:func:`cuda_precision`)."""
    from vrpo_kernels.dispatch import emulate_cuda

    plan = DRY_PLAN if dry_run else (QUICK_PLAN if quick else GPU_PLAN)
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to run the same code on the CPU")
    report = Report(device)
    t0 = time.perf_counter()
    measured, pred, gpu_name = {}, None, ""
    from vrpo_kernels.dispatch import interpreting

    emulate = emulate_cuda() if dry_run and interpreting() else contextlib.nullcontext()
    with PLANTS[plant]() if plant else contextlib.nullcontext(), emulate:
        preflight(report, dry_run)
        op = PLANT_OPS[plant] if plant else None
        if op in (None, "masked_linear_ce"):
            correctness_ce(report, plan, gpu_shapes)
        if op in (None, "attention"):
            correctness_attention(report, plan)
        if op in (None, "sample_masks"):
            correctness_masks(report, plan)
        if plant is None:
            determinism(report, plan)
            training_steps(report, plan)
            measured = timings(report, plan)
            gpu_name, pred = predictions(plan, device)
    elapsed = time.perf_counter() - t0
    print(
        "elapsed per section: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in section_seconds(report).items())
        + f"; total {elapsed:.1f} s",
        flush=True,
    )
    text = markdown(report, plan, measured, pred, gpu_name, elapsed, dry_run, plant)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.md")
    write_atomically(path, text)
    return report, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the same code on the CPU under the Triton interpreter, with tiny shapes",
    )
    parser.add_argument(
        "--out", help="directory for gpu_check.md (default: benchmarks/results; a temporary directory with --dry-run)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the checks that matter most, in at most 3 minutes on an H100 with a cold Triton cache "
        "(the full check: at most 6)",
    )
    parser.add_argument(
        "--gpu-shapes",
        action="store_true",
        help="with --dry-run: add the masked-CE checks at the GPU plan's head (H = 4096, V = 126,464) "
        "on a few dozen rows, through the torch path (a few minutes on a CPU)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the estimated seconds of --quick and of the full check (no GPU needed) and exit",
    )
    parser.add_argument(
        "--plant",
        choices=sorted(PLANTS),
        help="with --dry-run: run the correctness checks with this deliberately broken kernel; "
        "the run must fail (exit 1) and name the failing checks",
    )
    args = parser.parse_args(argv)
    if args.estimate:
        for name, plan in (("--quick", QUICK_PLAN), ("full", GPU_PLAN)):
            est, comp = estimated_seconds(plan), estimated_compiles(plan)
            print(
                f"{name}: {est['total']:.0f} s estimated on an H100, cold Triton cache ("
                + ", ".join(f"{k} {v:.0f} s" for k, v in est.items() if k != "total")
                + f"); Triton compiles: {comp}"
            )
        return 0
    if args.plant and not args.dry_run:
        parser.error("--plant breaks a kernel on purpose: only with --dry-run (never over the GPU results)")
    if args.gpu_shapes and not args.dry_run:
        parser.error("--gpu-shapes is a dry-run option (the GPU run always uses the GPU plan's shapes)")
    if args.quick and args.dry_run:
        parser.error("--quick selects the GPU plan's short version; the dry run is always the tiny plan")
    if args.dry_run and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    # Imported here, not at the top: benchmarks.common imports vrpo, hence triton, and the dry run must set
    # TRITON_INTERPRET first.
    from benchmarks.common import RESULTS

    out_dir = args.out or (tempfile.mkdtemp(prefix="gpu_check-") if args.dry_run else str(RESULTS))
    report, path = run(args.dry_run, out_dir, args.plant, args.quick, args.gpu_shapes)
    print(f"wrote {path}; {len(report.failed)} of {len(report.results)} checks failed")
    for r in report.failed:
        print(f"FAILED: {r.section}: {r.name}: {r.detail}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
