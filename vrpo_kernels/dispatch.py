"""How every op in ``vrpo_kernels`` picks its implementation.

Each op has one public entry point with an ``impl=`` switch (as in Apple's cut-cross-entropy):

* ``"triton"``: the fused Triton kernel. Runs on CUDA tensors, or on CPU tensors when
  ``TRITON_INTERPRET=1`` is set (slow; used by the tests).
* ``"torch"``: a PyTorch implementation, the fast CPU path.
* ``"eager"`` (``masked_linear_ce`` and ``bidirectional_attention`` only): the plain PyTorch
  reference, written for clarity, not speed. ``sample_masks`` has no separate reference: its
  ``"torch"`` path is already the plain one.
* ``"auto"``: ``"triton"`` on CUDA when Triton imports, ``"torch"`` otherwise (each op may send
  inputs its kernels do not cover to ``"torch"``, and logs that once).

A Triton that is installed but fails to import, or is missing where a CUDA device could use it, is
logged once at WARNING; the ops then run their ``"torch"`` paths.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "torch", "eager")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (Linux x86_64 wheels; absent on macOS/Windows).

    A failed import loses the fast CUDA path, so it is logged at WARNING (once: the result is cached)
    unless the package is simply absent on a machine without CUDA, where nothing is lost.
    """
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "triton" or torch.cuda.is_available():
            logger.warning("vrpo_kernels: triton is unavailable (%s); every op runs its 'torch' path", exc)
        return False
    except Exception as exc:  # a broken install: import errors of any kind
        logger.warning("vrpo_kernels: `import triton` failed (%s: %s); every op runs its 'torch' path",
                       type(exc).__name__, exc)
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
