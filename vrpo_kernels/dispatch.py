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

The fp32 matmul precision in force (IEEE or TF32), which decides the fp32 paths, has one reader here,
:func:`fp32_matmul_precision`, for every torch vrpo allows (2.6 to 2.13). Two APIs set it: the legacy
flag ``torch.backends.cuda.matmul.allow_tf32`` (and ``torch.set_float32_matmul_precision``) and, from
torch 2.9, ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32" or "none": inherit
``torch.backends.fp32_precision``). Once the new API has set a value, reading the legacy flag raises
("you have used mix of the legacy and new APIs"), so nothing in vrpo reads it directly. The environment
variable ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` (NVIDIA's NGC containers set it) makes cuBLAS run fp32
GEMMs in TF32 whatever the flags say; it counts as "tf32".
"""

from __future__ import annotations

import contextlib
import contextvars
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
        logger.warning(
            "vrpo_kernels: `import triton` failed (%s: %s); every op runs its 'torch' path", type(exc).__name__, exc
        )
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_EMULATE_CUDA = contextvars.ContextVar("vrpo_kernels_emulate_cuda", default=False)


@contextlib.contextmanager
def emulate_cuda():
    """Inside the block, CPU tensors follow the CUDA rules of every op: ``impl="auto"`` resolves as on
    CUDA (to ``"triton"``, which then runs in the interpreter) and each op's dtype policy is CUDA's (e.g.
    attention's Triton kernel refuses float32). Needs ``TRITON_INTERPRET=1``. Used by
    ``python -m benchmarks.gpu_check --dry-run``, so that a check which would fail on a GPU fails on the CPU."""
    if not interpreting():
        raise RuntimeError("emulate_cuda: needs TRITON_INTERPRET=1 (set before triton is imported)")
    token = _EMULATE_CUDA.set(True)
    try:
        yield
    finally:
        _EMULATE_CUDA.reset(token)


def cuda_rules(tensor: torch.Tensor) -> bool:
    """True when the ops apply their CUDA rules to ``tensor``: a CUDA tensor, or any inside
    :func:`emulate_cuda`."""
    return tensor.is_cuda or _EMULATE_CUDA.get()


def resolve_impl(impl: str, tensor: torch.Tensor, op: str, choices: tuple[str, ...] = IMPLS) -> str:
    """Turn ``impl`` (possibly ``"auto"``) into a concrete implementation name for ``op``.

    Raises ``ValueError`` naming the op and the valid choices for an unknown name, and
    ``RuntimeError`` when ``"triton"`` is asked for where it cannot run.
    """
    if impl not in choices:
        raise ValueError(f"{op}: impl={impl!r} is not one of {choices}")
    if impl == "auto":
        return "triton" if cuda_rules(tensor) and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' needs the triton package, which is not installed")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                f"{op}: impl='triton' on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use impl='torch' for the fast CPU path"
            )
    return impl


PRECISIONS = ("ieee", "tf32")


def _new_api():
    """``torch.backends.cuda.matmul`` when it has ``fp32_precision`` (torch >= 2.9), else None."""
    matmul = torch.backends.cuda.matmul
    try:
        matmul.fp32_precision
    except (AttributeError, RuntimeError):
        return None
    return matmul


def fp32_matmul_precision() -> str:
    """``"tf32"`` when fp32 matmuls (cuBLAS, and the Triton kernels that follow torch's setting) may run
    in TF32, else ``"ieee"``. Never raises, whichever API set the value."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0"):
        return "tf32"
    matmul = _new_api()
    if matmul is None:  # torch < 2.9: the legacy flag is the only one
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    value = matmul.fp32_precision
    if value == "none":  # inherit the global setting ("none" there too: torch's default, IEEE)
        value = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if value == "tf32" else "ieee"


@contextlib.contextmanager
def fp32_matmul_precision_set(precision: str):
    """Run the block with cuBLAS fp32 matmuls in ``precision`` ("ieee" or "tf32"), restored after, through
    the same API :func:`fp32_matmul_precision` reads (restoring the new API's value does not leave torch
    in the "mixed APIs" state; the legacy flag stays readable)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    matmul = _new_api()
    if matmul is None:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return
    old = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = old
