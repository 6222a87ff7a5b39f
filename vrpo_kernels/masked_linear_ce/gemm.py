"""The Triton backward's GEMMs with an fp32 result from 16-bit operands, in a form this torch has.

Two products need an fp32 result from fp16/bf16 operands: the logits (``out = a @ b``, written in fp32)
and, when the vocabulary runs in several chunks, the fp32 accumulator of ``d_hidden``
(``out += a @ b``). cuBLAS does both in one call, but torch exposes that only through the
``out_dtype`` overloads of ``torch.mm`` / ``torch.addmm`` (torch >= 2.8, CUDA only), and the
``addmm`` form with an fp32 ``self`` and 16-bit operands was refused ("self and mat2 must have the
same dtype", pytorch#154086) until pytorch#167931. So the form is chosen by feature detection, once
per (device type, dtype), in order of speed:

* product: ``"out_dtype"`` (one GEMM), else ``"upcast"`` (column blocks of ``b`` upcast to fp32
  into a reused buffer, fp32 GEMMs run in TF32: a 16-bit float is exact in TF32, so the products are
  exact and the accumulation fp32, at the TF32 peak, half the 16-bit one; IEEE fp32 GEMMs would be
  ~15x slower than the one-call form);
* accumulate: ``"addmm_out_dtype"`` (one GEMM), ``"mm_out_dtype_add"`` (one GEMM into an fp32
  scratch, then ``add_``), ``"scratch16_add"`` (a 16-bit product into scratch, then an fp32
  ``add_``: every torch has it; one extra rounding of each chunk's partial to the 16-bit dtype), else
  ``"upcast_add"``.

Each candidate is probed on the device against float64 before it is chosen; a candidate that raises
or disagrees is skipped. The choice is logged once at INFO (and at WARNING on CUDA when the one-call
form is lost). Everything here runs on the CPU too, so the tests drive every strategy there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..dispatch import fp32_matmul_precision_set

logger = logging.getLogger(__name__)

PRODUCTS = ("out_dtype", "upcast")
ACCUMULATES = ("addmm_out_dtype", "mm_out_dtype_add", "scratch16_add", "upcast_add")
# Columns of ``b`` upcast at a time by the "upcast" forms: bounds their scratch to 4 * k * this bytes.
UPCAST_COLS = 4096


@dataclass(frozen=True)
class GemmStrategy:
    """How the backward forms an fp32 product (``product``) and an fp32 accumulation (``accumulate``)
    from 16-bit operands; names from :data:`PRODUCTS` and :data:`ACCUMULATES`."""

    product: str
    accumulate: str


def _upcast_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` in fp32: ``a`` upcast once, ``b`` by blocks of UPCAST_COLS columns; the fp32
    GEMMs in TF32 (exact for 16-bit operands, whatever the user's fp32 setting)."""
    with fp32_matmul_precision_set("tf32"):
        _upcast_blocks(a, b, out, accumulate)


def _upcast_blocks(a, b, out, accumulate: bool) -> None:
    a32 = a.float()
    for c0 in range(0, b.shape[1], UPCAST_COLS):
        c1 = min(b.shape[1], c0 + UPCAST_COLS)
        b32 = b[:, c0:c1].float()
        if accumulate:
            out[:, c0:c1].addmm_(a32, b32)
        else:
            torch.mm(a32, b32, out=out[:, c0:c1])


def product(kind: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b``: a [m, k], b [k, n] 16-bit, out fp32 [m, n] (a strided view is fine)."""
    if kind == "out_dtype":
        torch.mm(a, b, out=out, out_dtype=torch.float32)
    elif kind == "upcast":
        _upcast_into(a, b, out, accumulate=False)
    else:
        raise ValueError(f"gemm product strategy {kind!r} is not one of {PRODUCTS}")


def accumulate(kind: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out += a @ b``: a [m, k], b [k, n] 16-bit, out fp32 [m, n] contiguous."""
    if kind == "addmm_out_dtype":
        torch.addmm(out, a, b, out=out, out_dtype=torch.float32)
    elif kind == "mm_out_dtype_add":
        out.add_(torch.mm(a, b, out_dtype=torch.float32))
    elif kind == "scratch16_add":
        out.add_(a @ b)
    elif kind == "upcast_add":
        _upcast_into(a, b, out, accumulate=True)
    else:
        raise ValueError(f"gemm accumulate strategy {kind!r} is not one of {ACCUMULATES}")


def scratch_bytes(strategy: GemmStrategy, m: int, k: int, n: int, dtype: torch.dtype, accumulating: bool) -> int:
    """Bytes of the temporaries one call allocates for an [m, k] @ [k, n] product (0 for one-call forms)."""
    es = torch.empty((), dtype=dtype).element_size()
    cols = min(n, UPCAST_COLS)
    kind = strategy.accumulate if accumulating else strategy.product
    return {
        "out_dtype": 0,
        "addmm_out_dtype": 0,
        "mm_out_dtype_add": 4 * m * n,
        "scratch16_add": es * m * n,
        "upcast": 4 * (m * k + k * cols),
        "upcast_add": 4 * (m * k + k * cols),
    }[kind]


# Probe shape: k long enough that an fp32 accumulation differs from a 16-bit one.
_PROBE = (33, 257, 45)


def _agrees(kind: str, accumulating: bool, device: torch.device, dtype: torch.dtype) -> bool:
    """Run one candidate on the device and compare it with float64 (bound: the 16-bit rounding of the
    partial for "scratch16_add", fp32 accumulation otherwise)."""
    m, k, n = _PROBE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    start = torch.randn(m, n, generator=g).to(device)
    out = start.clone()
    if accumulating:
        accumulate(kind, a, b, out)
    else:
        product(kind, a, b, out)
    ref = a.double() @ b.double() + (start.double() if accumulating else 0)
    unit = (torch.finfo(dtype).eps / 2) if kind == "scratch16_add" else 2.0**-24
    bound = 2 * unit * float((a.double().abs() @ b.double().abs()).max()) + 2**-24 * k * float(ref.abs().max())
    return float((out.double() - ref).abs().max()) <= bound


def _first_working(kinds: tuple[str, ...], accumulating: bool, device, dtype) -> tuple[str, dict]:
    refused = {}
    for kind in kinds:
        try:
            if _agrees(kind, accumulating, device, dtype):
                return kind, refused
            refused[kind] = "disagrees with float64"
        except Exception as exc:  # an overload this torch lacks raises TypeError/RuntimeError/NotImplementedError
            refused[kind] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    raise RuntimeError(f"masked_linear_ce: no GEMM form works on {device} for {dtype}: {refused}")


def detect(device: torch.device, dtype: torch.dtype) -> GemmStrategy:
    """The fastest correct strategy on ``device`` for ``dtype`` operands (probed, not cached)."""
    prod, lost_p = _first_working(PRODUCTS, False, device, dtype)
    acc, lost_a = _first_working(ACCUMULATES, True, device, dtype)
    strategy = GemmStrategy(prod, acc)
    logger.info(
        "masked_linear_ce: backward GEMMs on %s for %s: %s (torch %s; refused: %s)",
        device.type,
        dtype,
        strategy,
        torch.__version__,
        {**lost_p, **lost_a} or "none",
    )
    if device.type == "cuda" and (lost_p or lost_a):
        logger.warning(
            "masked_linear_ce: torch %s lacks the one-call fp32-output GEMM for %s (%s); the backward "
            "uses %s, which is slower",
            torch.__version__,
            dtype,
            {**lost_p, **lost_a},
            strategy,
        )
    return strategy


_CHOSEN: dict[tuple[str, torch.dtype], GemmStrategy] = {}


def strategy_for(device: torch.device, dtype: torch.dtype) -> GemmStrategy:
    """:func:`detect`'s choice for (device type, dtype), probed at first use and cached for the process."""
    key = (device.type, dtype)
    if key not in _CHOSEN:
        _CHOSEN[key] = detect(device, dtype)
    return _CHOSEN[key]
