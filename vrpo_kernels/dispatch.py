"""How every op in ``vrpo_kernels`` picks its implementation.

Each op has one public entry point with an ``impl=`` switch (as in Apple's cut-cross-entropy):

* ``"triton"``: the fused Triton kernel. Runs on CUDA tensors, or on CPU tensors when
  ``TRITON_INTERPRET=1`` is set (slow; used by the tests).
* ``"torch"``: a chunked PyTorch implementation of the same algorithm, the fast CPU path.
* ``"eager"``: the plain PyTorch reference, written for clarity, not speed.
* ``"auto"``: ``"triton"`` on CUDA when Triton imports, ``"torch"`` otherwise.
"""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "torch", "eager")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (Linux x86_64 wheels; absent on macOS/Windows)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, tensor: torch.Tensor, op: str, choices: tuple[str, ...] = IMPLS) -> str:
    """Turn ``impl`` (possibly ``"auto"``) into a concrete implementation name for ``op``.

    Raises ``ValueError`` naming the op and the valid choices for an unknown name, and
    ``RuntimeError`` when ``"triton"`` is asked for where it cannot run.
    """
    if impl not in choices:
        raise ValueError(f"{op}: impl={impl!r} is not one of {choices}")
    if impl == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' needs the triton package, which is not installed")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                f"{op}: impl='triton' on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use impl='torch' for the fast CPU path"
            )
    return impl
