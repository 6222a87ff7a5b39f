"""Philox4x32-10 in torch (int64 emulation of uint32) and through ``tl.philox``: :func:`philox4x32`."""

from __future__ import annotations

import torch

from .._triton_utils import on_device
from ..dispatch import resolve_impl, triton_available
from .common import _PHILOX_M, _PHILOX_W, _U32, PHILOX_ROUNDS

if triton_available():
    import triton

    from .kernels import _philox_kernel


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of ``a * m``, for int64 ``a`` in [0, 2^32) and ``m < 2^32``.

    The product needs up to 64 bits, past int64's 63: it wraps modulo 2^64 (two's complement, as every
    torch backend's integer multiply does), so its bit pattern is the unsigned product's, and the
    words are read with an arithmetic shift and a mask (tests check the extremes against Python's ints).
    """
    p = a * m
    return (p >> 32).bitwise_and_(_U32), p.bitwise_and_(_U32)


def philox4x32_words(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast together); four int64 words.

    Random123's round: ``(hi0, lo0) = mulhilo(M0, c0)``, ``(hi1, lo1) = mulhilo(M1, c2)``,
    ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped by ``W`` between rounds.
    Inputs that broadcast (a counter word per position, a key per row) stay small until a round mixes
    them.
    """
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = _xor3(hi1, c1, k0), lo1, _xor3(hi0, c3, k1), lo0
    return c0, c1, c2, c3


def _xor3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a ^ b ^ c`` with one allocation where ``c`` broadcasts into ``a ^ b``."""
    x = torch.bitwise_xor(a, b)
    return x.bitwise_xor_(c) if torch.broadcast_shapes(x.shape, c.shape) == x.shape else x ^ c


def _check_words(name: str, t: torch.Tensor, width: int):
    if t.dtype != torch.int64 or t.dim() < 1 or t.shape[-1] != width:
        raise ValueError(f"philox4x32: {name} must be an int64 tensor [..., {width}], got {t.dtype} {tuple(t.shape)}")
    if ((t < 0) | (t > _U32)).any():
        raise ValueError(f"philox4x32: every word of {name} must lie in [0, 2^32)")


def philox4x32(counter: torch.Tensor, key: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """Philox4x32-10 of each counter under its key: int64 [..., 4] words in [0, 2^32).

    Args:
        counter: int64 [..., 4], four 32-bit words each.
        key: int64 [..., 2] (broadcast against ``counter[..., :2]``), two 32-bit words each.
        impl: ``"torch"`` or ``"triton"`` (``tl.philox``, the generator the keyed-draw kernel uses).
    """
    _check_words("counter", counter, 4)
    _check_words("key", key, 2)
    impl = resolve_impl(impl, counter, "philox4x32", ("torch", "triton"))
    shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    counter, key = counter.expand(*shape, 4), key.expand(*shape, 2)
    if impl == "torch":
        return torch.stack(philox4x32_words(*counter.unbind(-1), *key.unbind(-1)), -1)
    flat_ctr, flat_key = counter.reshape(-1, 4).contiguous(), key.reshape(-1, 2).contiguous()
    out = torch.empty_like(flat_ctr)
    if out.shape[0]:
        with on_device(counter):
            _philox_kernel[(triton.cdiv(out.shape[0], 128),)](flat_ctr, flat_key, out, out.shape[0], BLOCK=128)
    return out.view(*shape, 4)
