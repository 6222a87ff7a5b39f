"""One command on the first GPU: preflight, correctness, determinism, training steps, timings.

    python -m benchmarks.gpu_check             # one H100/H200, under 8 minutes
    python -m benchmarks.gpu_check --dry-run   # the same code on the CPU: interpreter, tiny shapes

Sections (each check in its own try/except, so one failure does not end the run):

1. preflight: ``TRITON_INTERPRET`` unset and ``impl="auto"`` resolving to Triton for every op;
2. correctness against float64 chunked references: ``masked_linear_ce`` in bf16/fp16/fp32, with and
   without a bias, at (1, 4096, 126464), (300 of 1000 rows, 4096, 126464), (37, 4095, 50257),
   (5000, 64, 7), a ``-inf`` bias over the first vocabulary tile, a forward-only 65,536-row call;
   ``bidirectional_attention`` at head dims 32/64/80/96/128, GQA 1 and 4, S in {1, 127, 1000, 4096},
   packed segments with padding, [B, S, H, D] inputs as transformers passes them; ``sample_masks``
   counts exact at L in {1, 1023, 1024, 1025, 8192};
3. determinism: each op twice, ``torch.equal``;
4. one full VRPO training step (``VRPOTrainer.train_step``) on the tiny LLaDA and on a random
   LLaDA-architecture model of about 1B parameters in bf16 (head dim 128, V = 126,464: the real tile
   sizes), with ``torch.cuda.max_memory_allocated`` of the 1B step (:func:`llada_step_memory`) asserted
   within 10% of ``vrpo.plan``'s peak;
5. timings (``triton.testing.do_bench``, median ms, forward + backward) against CCE's Triton kernel,
   Liger's fused linear CE, flash-attn's varlen kernel and SDPA, beside the cost model's predictions
   (``python -m tools.roofline``).

Inputs are realistic, not uniform: each row's hidden state points at one "predicted" token (its
target half of the time), so the softmax has a top probability of about 0.5 and an entropy of a few
nats, as a trained LM head's (:func:`ce_inputs`); with random inputs the softmax part of the gradient
is ~1/V of it and a backward that dropped it would pass.

Tolerances: (1) max |got - ref| / max(max |ref|, 0.01) against float64 under 8 units of roundoff of the
arithmetic that runs: bf16 2^-8, fp16 2^-11, fp32 (IEEE dots unless TF32 is allowed) 2^-11; (2) the
softmax part of each gradient (the gradient minus its one-hot part) on its own, norm-relative, under
the rounding-error bound of the operations (:func:`softmax_part_bound`): the stored ``dz`` and the
result each rounded once (unit roundoff u), fp32 accumulation over the reduction length K (K 2^-24),
and the logits' own fp32 error (H 2^-24 max |h||W|) on the softmax.

Planted bugs: ``--dry-run --plant BUG`` runs the same checks with a deliberately broken kernel
(:data:`PLANTS`: onehot_only, skip_last_chunk, stale_lse, no_segment_mask, mask_count_off_by_one);
each must make the check exit non-zero naming the failing case.

Writes ``gpu_check.md`` atomically (device, driver, CUDA, torch and Triton versions, every check and
timing) into ``--out``: ``benchmarks/results`` for the GPU run, a temporary directory for ``--dry-run``
(never over the committed results). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

from benchmarks.common import RESULTS

# A LLaDA-architecture model of about 1.1B parameters: LLaDA 8B's head dim (128), vocabulary and
# embedding, 12 layers of width 2048 (untied head: 2 x 259M embedding parameters + 12 x 51M).
LLADA_1B = dict(d_model=2048, n_heads=16, n_layers=12, mlp_hidden_size=5632, vocab_size=126464,
                max_sequence_length=4096)
TINY_STEP_MODEL = dict(d_model=64, n_heads=2, n_layers=2, mlp_hidden_size=96, vocab_size=256, max_sequence_length=128)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run: the GPU plan, or the CPU dry run's tiny version of each item."""

    ce_cases: tuple  # (rows N, selected rows, H, V)
    ce_dtypes: tuple
    ce_forward_only: tuple  # (rows N, H, V, rows compared with the reference)
    ce_multi_chunk: tuple  # ((N, selected, H, V, max_buffer_bytes or None), ...): several vocabulary chunks
    ce_offsets_64: tuple  # (rows, H, V, rows compared): n_sel * H >= 2^31 in a no-grad forward
    ce_autocast: tuple  # (N, selected, H, V): bf16 autocast with fp32 master weights
    attn_head_dims: tuple
    attn_groups: tuple
    attn_lengths: tuple
    attn_batch_heads: tuple  # (B, query heads)
    mask_lengths: tuple
    step_models: tuple  # (name, model spec, pairs per step, n_t)
    bench_ce: tuple  # (N, H, V)
    bench_ce_dtype: torch.dtype
    bench_attn: tuple  # (B, S, H, D)


GPU_PLAN = Plan(
    ce_cases=((1, 1, 4096, 126464), (1000, 300, 4096, 126464), (37, 37, 4095, 50257), (5000, 5000, 64, 7)),
    ce_dtypes=(torch.bfloat16, torch.float16, torch.float32),
    ce_forward_only=(65536, 4096, 126464, 512),
    # 4000 rows at the default budget: 67,072 columns, 2 chunks; 2500 rows at 64 MiB: 6,656 columns, 19 chunks.
    ce_multi_chunk=((5000, 4000, 4096, 126464, None), (3000, 2500, 4096, 126464, 64 << 20)),
    ce_offsets_64=(524288, 4096, 126464, 256),
    ce_autocast=(1000, 700, 4096, 126464),
    attn_head_dims=(32, 64, 80, 96, 128), attn_groups=(1, 4), attn_lengths=(1, 127, 1000, 4096),
    attn_batch_heads=(2, 8),
    mask_lengths=(1, 1023, 1024, 1025, 8192),
    step_models=(("tiny LLaDA", TINY_STEP_MODEL, 4, 8), ("LLaDA-architecture 1.1B, bf16", LLADA_1B, 2, 8)),
    bench_ce=(4096, 4096, 126464),
    bench_ce_dtype=torch.bfloat16,
    bench_attn=(8, 4096, 32, 128),
)
DRY_PLAN = Plan(
    ce_cases=((1, 1, 32, 70), (12, 5, 32, 70), (7, 7, 31, 33)),
    # bf16 (the GPU plan's dtype; its forward kernel upcasts the tiles before tl.dot in the interpreter,
    # see vrpo_kernels._triton_utils.upcast_dots) and fp32 (the TF32 configuration).
    ce_dtypes=(torch.bfloat16, torch.float32),
    ce_forward_only=(40, 32, 70, 8),
    ce_multi_chunk=((12, 9, 32, 300, 4 * 9 * 128),),  # 3 chunks of 128, 128, 44 columns
    ce_offsets_64=(),  # 4 GiB of hidden states: not in the dry run
    ce_autocast=(12, 9, 32, 70),
    attn_head_dims=(24,), attn_groups=(1, 2), attn_lengths=(1, 21),
    attn_batch_heads=(1, 2),
    mask_lengths=(1, 40),
    step_models=(("tiny LLaDA, one layer", dict(TINY_STEP_MODEL, n_layers=1), 1, 2),),
    bench_ce=(16, 32, 70),
    bench_ce_dtype=torch.bfloat16,
    bench_attn=(1, 24, 2, 16),
)

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
    return mock.patch.object(triton_path, "_softmax_grad", lambda z, dz, bias, targets, lse, g, v0: real(
        z, dz, bias, targets, torch.full_like(lse, float("inf")), g, v0))


def _plant_skip_last_chunk():
    """The backward's last vocabulary chunk not computed (d_weight's rows left as allocated, d_hidden
    missing its share) whenever there are several."""
    from vrpo_kernels.masked_linear_ce import triton_path

    real = triton_path.vocab_chunks
    return mock.patch.object(triton_path, "vocab_chunks", lambda V, cols: (lambda c: c[:-1] if len(c) > 1 else c)(
        real(V, cols)))


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
    from vrpo_kernels import attention

    real = attention._kernel_segments
    return mock.patch.object(attention, "_kernel_segments", lambda seg, B, S, device: real(None, B, S, device))


def _plant_mask_count_off_by_one():
    """The exact-count sampler masks one position fewer than asked (where the count is positive)."""
    from vrpo_kernels import mask_sampling

    real = mask_sampling.sample_masks_triton

    def sampler(response_mask, counts=None, probs=None, generator=None, config=None):
        if counts is not None:
            counts = (counts - 1).clamp_min(0)
        return real(response_mask, counts, probs, generator, config)

    return mock.patch.object(mask_sampling, "sample_masks_triton", sampler)


PLANTS = {
    "onehot_only": _plant_onehot_only,
    "skip_last_chunk": _plant_skip_last_chunk,
    "stale_lse": _plant_stale_lse,
    "no_segment_mask": _plant_no_segment_mask,
    "mask_count_off_by_one": _plant_mask_count_off_by_one,
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
        probe = torch.zeros(1, device=report.device, dtype=torch.bfloat16)
        want = "triton" if not dry_run else "torch"  # on the CPU "auto" is the torch path by design
        got = {op: resolve_impl("auto", probe, op) for op in ("masked_linear_ce", "sample_masks", "bidirectional_attention")}
        wrong = {op: impl for op, impl in got.items() if impl != want}
        if wrong:
            raise AssertionError(f"impl='auto' resolves to {wrong}, expected {want!r}")
        return f"impl='auto' -> {want} for {sorted(got)}"

    report.check("preflight", "interpreter", interpreter_state)
    report.check("preflight", "auto dispatch", auto_resolves)


# --------------------------------------------------------------------------------------------------
# 2. correctness
# --------------------------------------------------------------------------------------------------


# Logit scale of the realistic inputs: logits of the other tokens ~ N(0, SIGMA^2); the predicted token's
# is raised to log(V) + SIGMA^2 / 2, the log-sum-exp of the others, so its probability is about 0.5 and
# the rest spreads with an entropy of about log(V) - SIGMA^2 / 2 nats (a few nats in all).
_LOGIT_SIGMA = 3.0


def ce_inputs(N, n_sel, H, V, dtype, device, bias=False, seed=0, minus_inf_tile=0):
    """Masked-CE inputs with a trained head's softmax: W ~ N(0, SIGMA^2 / H), each hidden state
    N(0, I) plus ``a W[p] / |W[p]|^2`` toward a predicted token p (the target for half of the rows, else
    a random token) with a = log V + SIGMA^2 / 2. ``minus_inf_tile`` > 0 puts -inf bias on the first that
    many columns (targets and predictions avoid them)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) * (_LOGIT_SIGMA / H**0.5)
    targets = torch.randint(minus_inf_tile, V, (N,), generator=g)
    predicted = torch.where(torch.rand(N, generator=g) < 0.5, targets,
                            torch.randint(minus_inf_tile, V, (N,), generator=g))
    raise_to = torch.log(torch.tensor(float(V))) + _LOGIT_SIGMA**2 / 2
    hidden = torch.randn(N, H, generator=g)
    wp = W[predicted]
    hidden += raise_to * wp / wp.pow(2).sum(-1, keepdim=True)
    x = dict(
        hidden=hidden.to(device=device, dtype=dtype),
        weight=W.to(device=device, dtype=dtype),
        targets=targets.to(device),
        row_weight=(torch.rand(N, generator=g) * 4).to(device),
        rows=torch.randperm(N, generator=g)[:n_sel].sort().values.to(device),
        cot=torch.randn(N, generator=g).to(device),
        bias=None,
    )
    if bias or minus_inf_tile:
        b = torch.randn(V, generator=g)
        b[:minus_inf_tile] = float("-inf")
        x["bias"] = b.to(device=device, dtype=dtype)
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
    never [N, V]."""
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
        for parts, m, w_op, h_op in ((grads, dz, W, h[r]), (soft, gp, W, h[r]),
                                     (abs_dz, dz.abs(), hW_abs, h_abs[r]), (abs_soft, gp.abs(), hW_abs, h_abs[r])):
            parts[0][r] = m @ w_op  # d_hidden rows
            parts[1] += m.T @ h_op  # d_weight
            if parts[2] is not None:
                parts[2] += m.sum(0)  # d_bias
    return CERef(out, tuple(grads), tuple(soft), tuple(abs_dz), tuple(abs_soft), max_terms)


def softmax_part_bound(dtype, reduction: int, H: int, ref: CERef, i: int, interpreter: bool,
                       inputs_rounded: bool = False) -> float:
    """Norm-relative bound on the error of gradient ``i``'s softmax part: ``(c u + u_out + K 2^-24)
    |sum |dz||X|| + 2 delta |sum |gp||X||``, over |softmax part|, with u the compute dtype's unit
    roundoff (``dz`` stored once; c = 2 under the interpreter, whose fp32 -> bf16 cast truncates; one
    more u for the per-chunk rounding of a 16-bit d_hidden partial), u_out the returned gradient's
    rounding, K the reduction length, delta = 2 H 2^-24 max |h||W| the logits' fp32 error (forward LSE
    and backward logits) acting on the softmax (relative error ~delta per probability). With
    ``inputs_rounded`` (autocast: fp32 masters rounded to ``dtype``) each operand's rounding adds u to
    the product term and 2 u max |h||W| to delta."""
    u = _UNIT[dtype]
    delta = (2 * H * _FP32_ACC + (2 * u if inputs_rounded else 0)) * ref.max_abs_logit_terms
    stored = ((2 if interpreter else 1) + 2 + (1 if inputs_rounded else 0)) * u
    scale = float(ref.abs_dz[i].norm()) * (stored + reduction * _FP32_ACC)
    scale += 2 * delta * float(ref.abs_soft[i].norm())
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
            return masked_linear_ce(h, W, x["targets"], x["row_weight"], x["rows"], bias=b, impl=impl,
                                    max_buffer_bytes=max_buffer_bytes)

    if not grad:
        with torch.no_grad():
            return call(), None, None, None
    out = call()
    leaves = [h, W] + ([b] if b is not None else [])
    grads = torch.autograd.grad((out * x["cot"]).sum(), leaves)
    return out.detach(), grads[0], grads[1], grads[2] if b is not None else None


def check_ce_case(x, dtype, max_buffer_bytes=None, autocast=False) -> str:
    got = ce_run(x, "triton", max_buffer_bytes=max_buffer_bytes, autocast=autocast)
    ref = ce_reference(x)
    n_sel, H = int(x["rows"].numel()), x["hidden"].shape[1]
    V = x["weight"].shape[0]
    interpreter = x["hidden"].device.type != "cuda"
    errs = []
    for i, (name, a, r) in enumerate(zip(("out", "d_hidden", "d_weight", "d_bias"), got, (ref.out,) + ref.grads)):
        if r is None:
            continue
        if not torch.isfinite(a).all():
            raise AssertionError(f"{name} has non-finite values")
        errs.append(f"{name} {_assert_close(name, a, r, dtype):.1e}")
        if i == 0:
            continue
        # The softmax part alone: the one-hot part is exact in the reference, so subtracting it from
        # both leaves the error of the softmax part, relative to that part's own norm.
        err = float((a.double() - r).norm()) / max(float(ref.soft[i - 1].norm()), 1e-30)
        bound = softmax_part_bound(dtype, V if i == 1 else n_sel, H, ref, i - 1, interpreter, autocast)
        if not err <= bound:
            raise AssertionError(f"{name} softmax part: norm-relative error {err:.2e} > bound {bound:.2e}")
        errs.append(f"{name} softmax part {err:.1e} (bound {bound:.1e})")
    return ", ".join(errs)


def correctness_ce(report: Report, plan: Plan) -> None:
    dev = report.device
    for (N, n_sel, H, V) in plan.ce_cases:
        for dtype in plan.ce_dtypes:
            for bias in (False, True):
                name = f"masked_linear_ce {n_sel} of {N} rows, H={H}, V={V}, {str(dtype)[6:]}, bias={bias}"
                report.check("correctness", name, lambda: check_ce_case(ce_inputs(N, n_sel, H, V, dtype, dev, bias), dtype))
    from vrpo_kernels.masked_linear_ce.triton_path import _config

    N, n_sel, H, V = plan.ce_cases[1]
    dtype = plan.bench_ce_dtype
    tile = _config("forward", dtype, dev)["BLOCK_V"]
    report.check("correctness", f"masked_linear_ce -inf bias on the first vocabulary tile ({tile} columns), "
                 f"{str(dtype)[6:]}",
                 lambda: check_ce_case(ce_inputs(N, n_sel, H, V, dtype, dev, minus_inf_tile=tile), dtype))

    def forward_only():
        N, H, V, compared = plan.ce_forward_only
        x = ce_inputs(N, N, H, V, dtype, dev, seed=1)
        out = ce_run(x, "triton", grad=False)[0]
        rows = torch.linspace(0, N - 1, compared, device=dev).long()
        ref = ce_reference(x, rows=rows).out
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite output")
        return f"out {_assert_close('out', out[rows], ref[rows], dtype):.1e} on {compared} rows"

    report.check("correctness", f"masked_linear_ce forward only, {plan.ce_forward_only[0]} rows, no_grad, "
                 f"{str(dtype)[6:]}", forward_only)
    for (N, n_sel, H, V, budget) in plan.ce_multi_chunk:
        name = (f"masked_linear_ce multi-chunk backward {n_sel} of {N} rows, H={H}, V={V}, "
                f"max_buffer_bytes={budget or 'default'}, {str(dtype)[6:]}")
        report.check("correctness", name, lambda: _multi_chunk(N, n_sel, H, V, budget, dtype, dev))
    report.check("correctness", "masked_linear_ce n_sel*H >= 2^31, no_grad forward (64-bit offsets)",
                 lambda: _offsets_64(plan, dev))
    N, n_sel, H, V = plan.ce_autocast
    report.check("correctness", f"masked_linear_ce bf16 autocast, fp32 master weights, {n_sel} of {N} rows, V={V}",
                 lambda: check_ce_case(ce_inputs(N, n_sel, H, V, torch.float32, dev, bias=True), torch.bfloat16,
                                       autocast=True))
    report.check("correctness", "masked_linear_ce on cuda:1", lambda: _second_gpu(dev))
    N, n_sel, H, V, budget = plan.ce_multi_chunk[-1]
    report.check("correctness", f"masked_linear_ce backward GEMM forms, each forced, {n_sel} rows, V={V}",
                 lambda: _gemm_forms(N, n_sel, H, V, budget, dev))


def _gemm_forms(N, n_sel, H, V, budget, dev) -> str:
    """Every GEMM form of vrpo_kernels.masked_linear_ce.gemm that this torch runs on the device, forced in
    turn, at a multi-chunk call against float64; the ones it lacks are listed (the probe refuses them)."""
    from vrpo_kernels.masked_linear_ce import gemm

    dtype = torch.bfloat16
    detected = gemm.detect(dev, dtype)
    x = ce_inputs(N, n_sel, H, V, dtype, dev, seed=4)
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
    return f"detected {detected}; passed: {', '.join(ran)}; not in torch {torch.__version__}: {', '.join(lacking) or 'none'}"


def _multi_chunk(N, n_sel, H, V, budget, dtype, dev) -> str:
    from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES
    from vrpo_kernels.masked_linear_ce.triton_path import grad_chunk_cols, vocab_chunks

    chunks = len(vocab_chunks(V, grad_chunk_cols(n_sel, V, budget or DEFAULT_MAX_BUFFER_BYTES)))
    if chunks < 2:
        raise AssertionError(f"the case runs {chunks} chunk: it does not test the accumulation")
    return f"{chunks} chunks: " + check_ce_case(ce_inputs(N, n_sel, H, V, dtype, dev, seed=2), dtype, budget)


def _offsets_64(plan: Plan, dev) -> str:
    if not plan.ce_offsets_64:
        raise Skipped("needs n_sel * H >= 2^31 elements of hidden states (4 GiB in bf16): GPU run only")
    N, H, V, compared = plan.ce_offsets_64
    if N * H < 2**31:
        raise AssertionError(f"{N} x {H} < 2^31: the case does not pass 32-bit offsets")
    x = ce_inputs(compared, compared, H, V, torch.bfloat16, dev, seed=3)
    # The compared rows at the end of a [N, H] tensor, past 2^31 elements; the rest is zeros.
    hidden = torch.zeros(N, H, dtype=torch.bfloat16, device=dev)
    hidden[N - compared:] = x["hidden"]
    targets = torch.zeros(N, dtype=torch.long, device=dev)
    targets[N - compared:] = x["targets"]
    rows = torch.arange(N, device=dev)
    from vrpo_kernels import masked_linear_ce

    with torch.no_grad():
        out = masked_linear_ce(hidden, x["weight"], targets, torch.ones(N, device=dev), rows, impl="triton")
    x["row_weight"] = torch.ones(compared, device=dev)
    ref = ce_reference(x).out
    return f"out {_assert_close('out', out[N - compared:], ref, torch.bfloat16):.1e} on the last {compared} rows"


def _second_gpu(dev) -> str:
    if dev.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skipped("no second GPU")
    x = ce_inputs(37, 37, 4095, 50257, torch.bfloat16, torch.device("cuda:1"), bias=True)
    return check_ce_case(x, torch.bfloat16)


def attn_inputs(B, S, Hq, Hkv, D, dtype, device, seed=0):
    """q/k/v as [B, H, S, D] views of [B, S, H, D] (as transformers passes them), packed segments with
    a padding tail."""
    from benchmarks.kernels import packed_segments

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, h, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
               for h in (Hq, Hkv, Hkv))
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
    dtypes = (torch.bfloat16, torch.float16)
    for D in plan.attn_head_dims:
        for group in plan.attn_groups:
            for S in plan.attn_lengths:
                dtype = dtypes[(D + S) % 2]  # both dtypes across the grid, one per case
                name = f"attention D={D}, GQA {group}, S={S}, B={B}, {Hq} heads, {str(dtype)[6:]}"
                report.check("correctness", name,
                             lambda: check_attention_case(B, S, Hq, Hq // group, D, dtype, report.device))


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
    report.check("determinism", f"masked_linear_ce {N}x{H}x{V} {str(plan.bench_ce_dtype)[6:]} fwd+bwd", lambda: _same_twice(lambda: ce_run(x, "triton")))
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


def build_step_trainer(spec: dict, pairs: int, n_t: int, workdir: str, dtype=None, seed: int = 0):
    """A ``VRPOTrainer`` on the toy preference task with a random LLaDA-architecture model ``spec``, the
    fused head and every kernel on ``impl="triton"`` (vrpo_triton attention)."""
    from vrpo.models import build_tiny_llada, build_tiny_tokenizer
    from vrpo.tasks.sort import SORT_TASK
    from vrpo.training import VRPOTrainer, loading
    from vrpo.training.config import VRPOConfig

    cfg = VRPOConfig(
        output_dir=workdir, overwrite_output_dir=True, report_to="none", num_samples=0, save_steps=0, seed=seed,
        eval_size=0, per_device_train_batch_size=pairs, n_t=n_t, n_yt=1, max_steps=10, fused_head=True,
        kernel_impl="triton", attn_implementation="vrpo_triton",
    ).resolved(SORT_TASK.presets)
    tokenizer = build_tiny_tokenizer(vocab_size=spec["vocab_size"])
    train_pairs, _, _ = loading.load_pairs(cfg, tokenizer, SORT_TASK)
    model = build_tiny_llada(seed=seed, attn_implementation="vrpo_triton", dtype=dtype or torch.float32, **spec)
    return VRPOTrainer(cfg, model=model, tokenizer=tokenizer, train_pairs=train_pairs, eval_pairs=None, task=SORT_TASK)


def _policy_parameters(trainer):
    return trainer.accelerator.unwrap_model(trainer.policy_elbo).parameters()


def llada_step_memory(spec: dict = LLADA_1B, pairs: int = 2, n_t: int = 8, dtype=torch.bfloat16) -> dict:
    """Peak CUDA memory of one VRPO training step of a random LLaDA-architecture model (``spec``, default
    about 1.1B parameters in bf16): a warm-up step (optimizer state, lazy initialisation), then
    ``torch.cuda.max_memory_allocated`` over a second step. Returns parameters, step seconds, the
    allocated bytes before the step, the peak, and the peak minus the before."""
    from vrpo.models.attention import attention_impl

    with tempfile.TemporaryDirectory() as workdir, attention_impl("triton"):
        trainer = build_step_trainer(spec, pairs, n_t, workdir, dtype=dtype)
        params = sum(p.numel() for p in _policy_parameters(trainer))
        planned = planned_peak_bytes(trainer)
        applied, metrics, _ = trainer.train_step(0)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        applied2, metrics, _ = trainer.train_step(1)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
    if not (applied and applied2):
        raise RuntimeError(f"train_step was skipped (non-finite loss or gradient): {metrics}")
    return dict(params=params, seconds=seconds, before_bytes=before, peak_bytes=peak, step_bytes=peak - before,
                planned_bytes=planned)


def planned_peak_bytes(trainer) -> int:
    """``python -m vrpo.plan``'s per-GPU peak for the trainer's run and model (one GPU, no sharding): the
    figure that ``max_memory_allocated`` is compared with (the plan is an upper bound: it assumes every
    sequence is ``max_length`` tokens)."""
    from vrpo.plan import peak_memory_bytes

    return peak_memory_bytes(trainer.config, model=trainer.policy_model)


def training_steps(report: Report, plan: Plan) -> None:
    from vrpo.models.attention import attention_impl

    for name, spec, pairs, n_t in plan.step_models:
        def step(spec=spec, pairs=pairs, n_t=n_t):
            if report.device.type == "cuda" and spec is LLADA_1B:
                m = llada_step_memory(spec, pairs, n_t)
                if abs(m["peak_bytes"] - m["planned_bytes"]) > 0.1 * m["planned_bytes"]:
                    raise AssertionError(f"max_memory_allocated {m['peak_bytes'] / 2**30:.2f} GiB is not within 10% of "
                                         f"vrpo.plan's {m['planned_bytes'] / 2**30:.2f} GiB")
                return (f"{m['params'] / 1e9:.2f}B params, step {m['seconds']:.2f} s, max_memory_allocated "
                        f"{m['peak_bytes'] / 2**30:.2f} GiB (step adds {m['step_bytes'] / 2**30:.2f} GiB); "
                        f"vrpo.plan's peak {m['planned_bytes'] / 2**30:.2f} GiB")
            with tempfile.TemporaryDirectory() as workdir, attention_impl("triton"):
                trainer = build_step_trainer(spec, pairs, n_t, workdir)
                if report.device.type == "cuda":
                    trainer_device = next(_policy_parameters(trainer)).device
                    if trainer_device.type != "cuda":
                        raise AssertionError(f"the trainer put the model on {trainer_device}")
                applied, metrics, tokens = trainer.train_step(0)
                planned = planned_peak_bytes(trainer)
            if not applied:
                raise AssertionError(f"the step was skipped (non-finite loss or gradient): {metrics}")
            return (f"applied, {tokens} tokens, VRPO loss {float(metrics['loss/vrpo']):.4f}, grad norm "
                    f"{metrics['grad_norm']:.3g}; vrpo.plan's peak {planned / 2**20:.1f} MiB")

        report.check("training step", name, step)


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


def _agrees_with_peer(x, make_loss, dev) -> str:
    """A peer's log-probs and gradients (hidden, weight) against ours on the selected rows, relative to
    max |ours|: within twice the bf16 bound of one implementation against float64 (2 x 8 x 2^-8)."""
    if dev.type != "cuda":
        raise Skipped("a CUDA kernel: not run in the dry run")
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


def timings(report: Report, plan: Plan) -> dict:
    """Times every implementation it can import; returns the measured ms per (op, impl)."""
    from vrpo_kernels.attention import bidirectional_attention

    dev = report.device
    measured = {}

    def timed(op, impl, make, peer=True):
        def run():
            if peer and dev.type != "cuda":
                raise Skipped("a CUDA kernel: not run in the dry run")
            try:
                fn = make()
            except ImportError as exc:
                raise Skipped(f"not installed ({exc}); pip install '.[bench]'") from exc
            ms = bench_ms(fn, dev)
            measured[(op, impl)] = ms
            return f"{ms:.3f} ms"

        report.check("timing", f"{op}: {impl}", run)

    N, H, V = plan.bench_ce
    x = ce_inputs(N, N, H, V, plan.bench_ce_dtype, dev)
    timed("masked_ce", "vrpo triton", lambda: (lambda: ce_run(x, "triton")), peer=False)

    timed("masked_ce", "CCE (impl='cce')", lambda: _gathered_ce(x, cce_loss()))
    timed("masked_ce", "CCE (impl='cce', filter_eps=None)", lambda: _gathered_ce(x, cce_loss(None)))
    timed("masked_ce", "Liger fused linear CE", lambda: _gathered_ce(x, liger_loss()))
    for name, make in (("CCE (filter_eps=None)", lambda: cce_loss(None)), ("Liger fused linear CE", liger_loss)):
        report.check("correctness", f"masked_ce agrees with {name}", lambda make=make: _agrees_with_peer(x, make, dev))

    B, S, Hh, D = plan.bench_attn
    q, k, v, _ = attn_inputs(B, S, Hh, Hh, D, torch.bfloat16, dev)
    one_segment = torch.zeros(B, S, dtype=torch.long, device=dev)

    def attention_fn(forward):
        def run():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = forward(*leaves)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        return run

    timed("attention", "vrpo triton", lambda: attention_fn(
        lambda a, b, c: bidirectional_attention(a, b, c, one_segment, impl="triton")), peer=False)
    packed = attn_inputs(B, S, Hh, Hh, D, torch.bfloat16, dev)[3]
    timed("attention", "vrpo triton, packed segments", lambda: attention_fn(
        lambda a, b, c: bidirectional_attention(a, b, c, packed, impl="triton")), peer=False)

    def flash():
        from benchmarks.kernels import flash_attn_forward

        pack, forward, _ = flash_attn_forward(q, k, v, one_segment)
        pq, pk, pv = (pack(t).contiguous() for t in (q, k, v))

        def run():
            leaves = [t.detach().requires_grad_() for t in (pq, pk, pv)]
            out = forward(*leaves)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        return run

    timed("attention", "flash-attn varlen", flash)
    timed("attention", "SDPA", lambda: attention_fn(torch.nn.functional.scaled_dot_product_attention), peer=False)
    return measured


def predictions(plan: Plan, device) -> tuple[str, object]:
    from tools import roofline
    from vrpo_kernels.gpus import GPUS

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpu = GPUS["h200" if "H200" in name else "a100" if "A100" in name else "h100"]
    return gpu.name, roofline.predict(gpu, plan.bench_ce, plan.bench_attn)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def environment(device) -> list[str]:
    import triton

    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
                     f"capability {props.major}.{props.minor}")
        lines.append(f"- CUDA {torch.version.cuda}, driver {_driver_version()}")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}), Triton interpreter (dry run)")
    return lines


def _driver_version() -> str:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return run.stdout.strip().splitlines()[0] if run.returncode == 0 and run.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"


def markdown(report: Report, plan: Plan, measured: dict, pred, gpu_name: str, seconds: float, dry_run: bool,
             plant: str | None = None) -> str:
    out = ["# GPU check" + (" (dry run on the CPU: interpreter, tiny shapes)" if dry_run else "")
           + (f", planted bug {plant!r}" if plant else ""), ""]
    out += environment(report.device)
    skipped = sum(r.skipped for r in report.results)
    out += [f"- {len(report.results) - len(report.failed) - skipped} of {len(report.results)} checks passed, "
            f"{skipped} skipped, in {seconds:.0f} s", ""]
    out += ["| section | check | result | s | detail |", "|---|---|---|---|---|"]
    for r in report.results:
        out.append(f"| {r.section} | {r.name} | {r.status} | {r.seconds:.1f} | "
                   f"{r.detail.replace('|', '/')} |")
    if pred is None:  # a planted-bug run: correctness only
        return "\n".join(out + [""])
    N, H, V = plan.bench_ce
    B, S, Hh, D = plan.bench_attn
    out += ["", f"## Measured against the cost model ({gpu_name} peaks; `python -m tools.roofline`)", "",
            f"masked CE fwd+bwd at N={N}, H={H}, V={V} bf16; attention fwd+bwd at {B} x {S}, {Hh} heads, D={D} bf16, "
            "one sample per row. Median ms of `triton.testing.do_bench`. The ideal is a floor; the expected time "
            "an estimate (stated efficiencies and wave quantization).", "",
            "| op | implementation | measured ms | predicted ms (ours) | expected ms | ideal ms | measured / predicted |",
            "|---|---|---|---|---|---|---|"]
    for (op, impl), ms in measured.items():
        p, e, ideal = ((pred.masked_ce_s, pred.masked_ce_expected_s, pred.masked_ce_ideal_s) if op == "masked_ce"
                       else (pred.attention_s, pred.attention_expected_s, pred.attention_ideal_s))
        out.append(f"| {op} | {impl} | {ms:.3f} | {p * 1e3:.3f} | {e * 1e3:.3f} | {ideal * 1e3:.3f} | "
                   f"{ms / (p * 1e3):.2f} |")
    out += ["", pred.expected_summary(), pred.summary(), ""]
    return "\n".join(out)


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


def run(dry_run: bool = False, out_dir: str | None = None, plant: str | None = None) -> tuple[Report, str]:
    """Run every section (with a ``plant``: the correctness sections only, under that planted bug); write
    ``gpu_check.md`` into ``out_dir``. Returns (report, path)."""
    plan = DRY_PLAN if dry_run else GPU_PLAN
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to run the same code on the CPU")
    report = Report(device)
    t0 = time.perf_counter()
    measured, pred, gpu_name = {}, None, ""
    with PLANTS[plant]() if plant else contextlib.nullcontext():
        preflight(report, dry_run)
        correctness_ce(report, plan)
        correctness_attention(report, plan)
        correctness_masks(report, plan)
        if plant is None:
            determinism(report, plan)
            training_steps(report, plan)
            measured = timings(report, plan)
            gpu_name, pred = predictions(plan, device)
    text = markdown(report, plan, measured, pred, gpu_name, time.perf_counter() - t0, dry_run, plant)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.md")
    write_atomically(path, text)
    return report, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same code on the CPU under the Triton interpreter, with tiny shapes")
    parser.add_argument("--out", help="directory for gpu_check.md (default: benchmarks/results; a temporary "
                                      "directory with --dry-run)")
    parser.add_argument("--plant", choices=sorted(PLANTS),
                        help="with --dry-run: run the correctness checks with this deliberately broken kernel; "
                             "the run must fail (exit 1) and name the failing checks")
    args = parser.parse_args(argv)
    if args.plant and not args.dry_run:
        parser.error("--plant breaks a kernel on purpose: only with --dry-run (never over the GPU results)")
    if args.dry_run and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    out_dir = args.out or (tempfile.mkdtemp(prefix="gpu_check-") if args.dry_run else str(RESULTS))
    report, path = run(args.dry_run, out_dir, args.plant)
    print(f"wrote {path}; {len(report.failed)} of {len(report.results)} checks failed")
    for r in report.failed:
        print(f"FAILED: {r.section}: {r.name}: {r.detail}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
