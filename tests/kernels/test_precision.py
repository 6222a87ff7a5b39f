"""The one reader of the fp32 matmul precision (vrpo_kernels.dispatch.fp32_matmul_precision) and the
CUDA rules applied to CPU tensors (vrpo_kernels.dispatch.emulate_cuda), which make gpu_check's dry run
fail where a GPU run would."""

from __future__ import annotations

import pytest
import torch

from vrpo_kernels import bidirectional_attention, masked_linear_ce
from vrpo_kernels.dispatch import emulate_cuda, fp32_matmul_precision, fp32_matmul_precision_set, resolve_impl
from vrpo_kernels.masked_linear_ce import triton_path


def _small_fp32_call():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(5, 8, generator=g), torch.randn(70, 8, generator=g)
    t = torch.randint(0, 70, (5,), generator=g)
    return masked_linear_ce(h, W, t, torch.ones(5), torch.ones(5, dtype=torch.bool), impl="triton")


@pytest.mark.interpreter
def test_fp32_calls_work_after_the_new_precision_api_is_used():
    """Item 2 of issue 29: on torch >= 2.9, once ``torch.backends.cuda.matmul.fp32_precision`` has been set,
    reading the legacy ``allow_tf32`` raises; the fp32 Triton path read it on every call (and raised)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy flag (the helper reads it)")
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert triton_path.dot_precision(torch.float32) == "tf32" == fp32_matmul_precision()
        assert torch.isfinite(_small_fp32_call()).all()
        matmul.fp32_precision = "ieee"
        assert triton_path.dot_precision(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision = old
    assert matmul.allow_tf32 in (False, True)  # restored: the legacy flag reads again


def test_the_ngc_override_counts_as_tf32(monkeypatch):
    """NGC containers set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1: cuBLAS runs fp32 GEMMs in TF32 whatever the flags."""
    assert fp32_matmul_precision() == "ieee"
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    assert fp32_matmul_precision() == "tf32"


def test_the_precision_context_sets_and_restores():
    with fp32_matmul_precision_set("tf32"):
        assert fp32_matmul_precision() == "tf32"
    assert fp32_matmul_precision() == "ieee"
    with pytest.raises(ValueError, match="precision"):
        with fp32_matmul_precision_set("bf16"):
            pass


@pytest.mark.interpreter
def test_cuda_rules_on_cpu_tensors():
    """Item 1 of issue 29: the dry run followed the CPU's rules (the interpreter accepts fp32 attention), so
    the GPU's refusal of fp32 Triton attention never showed. Under emulate_cuda the CPU tensors get CUDA's
    dispatch and dtype policy."""
    q = torch.randn(1, 2, 5, 16)
    assert resolve_impl("auto", q, "bidirectional_attention") == "torch"
    bidirectional_attention(q, q, q, impl="triton")  # the interpreter's rule: fp32 accepted
    with emulate_cuda():
        assert resolve_impl("auto", q, "bidirectional_attention") == "triton"
        with pytest.raises(ValueError, match="on cuda supports"):
            bidirectional_attention(q, q, q, impl="triton")
        out = bidirectional_attention(q, q, q)  # auto: fp32 goes to the torch path, as on CUDA
        torch.testing.assert_close(out, bidirectional_attention(q, q, q, impl="torch"))
        bidirectional_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())  # bf16: the Triton kernel
    assert resolve_impl("auto", q, "masked_linear_ce") == "torch"
