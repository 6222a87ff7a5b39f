"""Helpers shared by the Triton kernel files: the launch device, the interpreter's 16-bit dots, and
the ahead-of-time specification of a kernel configuration (``aot_specs()``, read by
:mod:`tools.aot_report`)."""

from __future__ import annotations

import contextlib

import torch

from .dispatch import interpreting, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton wheels
    triton = None


def on_device(t: torch.Tensor):
    """Context manager that makes ``t``'s CUDA device current for a launch (a no-op on the CPU).

    Triton launches on the *current* device; a tensor on ``cuda:1`` while ``cuda:0`` is current
    would otherwise be read from the wrong device.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def upcast_dots(dtype: torch.dtype, precision: str | None = None) -> bool:
    """The value of a kernel's ``UPCAST_DOT`` constexpr for inputs of ``dtype`` whose ``tl.dot`` runs
    at ``precision`` (the kernel's ``INPUT_PRECISION``; None: IEEE fp32 or 16-bit operands).

    True only under ``TRITON_INTERPRET=1``, where :func:`dot` then computes what the GPU's tensor cores
    compute: for 16-bit floats the interpreter computes a bfloat16 ``tl.dot`` wrongly, so the tiles are
    converted to float32 right before the product (the product of two 16-bit floats is exact in
    float32 and the accumulator is float32 on the GPU too); for float32 tiles at ``"tf32"`` the
    interpreter would multiply in full fp32, so the tiles are rounded to TF32 first (10 mantissa bits,
    round to nearest, ties away: the GPU's ``cvt.rna.tf32.f32``). Every load, store and conversion
    around the dot still runs as on the GPU. False on the GPU (the flag then compiles away).
    """
    if not interpreting():
        return False
    return dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and precision == "tf32")


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32 (10 mantissa bits, round to nearest, ties away from zero), as the
    tensor cores round fp32 operands: the CPU emulation of a TF32 GEMM's inputs (used by the dry run)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


if triton is not None:

    @triton.jit
    def dot(a, b, acc, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr = None):
        """``tl.dot(a, b, acc, input_precision=INPUT_PRECISION)``; with UPCAST_DOT (interpreter only, see
        :func:`upcast_dots`) on float32 copies of the tiles (fp32 tiles rounded to TF32). ``acc`` may be
        None; INPUT_PRECISION (e.g.
        ``"tf32"``) matters for fp32 tiles on the GPU only, None is Triton's default."""
        if UPCAST_DOT:
            if a.dtype == tl.float32:  # fp32 tiles at "tf32": round the operands as the tensor cores do
                a = ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
                b = ((b.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def _scalar_spec(value) -> tuple[str, bool]:
    """Triton's own specialisation of a scalar argument: (type, divisible by 16)."""
    if isinstance(value, bool):
        raise TypeError("aot_spec: pass booleans as constexprs")
    if isinstance(value, float):
        return "fp32", False
    if value == 1:
        return "constexpr", False
    return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0


def aot_spec(name: str, fn, pointers: dict, scalars: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """One ``aot_specs()`` entry, specialised as the JIT specialises a call with these arguments.

    pointers: argument -> triton element type (``"bf16"``, ``"fp32"``, ``"i64"``...); torch allocations
    are 16-byte aligned, so each gets the divisibility hint the JIT gives it. scalars: argument -> a
    representative value (the strides and sizes of the shape being inspected), from which the type,
    the divisibility-by-16 hint and the value-1 constexpr are derived as the JIT derives them.
    constexprs: argument -> value. Every argument of ``fn`` must appear in exactly one of the three.

    Returns a dict with name, fn, signature, constexprs, attrs, num_warps, num_stages.
    """
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, arg in enumerate(fn.arg_names):
        if arg in pointers:
            signature[arg] = "*" + pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in scalars:
            ty, div16 = _scalar_spec(scalars[arg])
            signature[arg] = ty
            if ty == "constexpr":
                consts[arg] = scalars[arg]
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in constexprs:
            signature[arg] = "constexpr"
        else:
            raise KeyError(f"aot_spec({name}): no type for argument {arg!r} of {fn.__name__}")
    return {
        "name": name,
        "fn": fn,
        "signature": signature,
        "constexprs": consts,
        "attrs": attrs,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
