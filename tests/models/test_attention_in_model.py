"""The Triton attention kernel inside the model (interpreter on the CPU): fixture logits, packing, grads."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from vrpo.models import attention_impl, load_llada, pack_rows, packing_kwargs

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "llada-tiny"
EOS = 251

pytestmark = pytest.mark.interpreter


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def model():
    return load_llada(FIXTURE, attn_implementation="vrpo_triton").eval()


def test_fixture_logits_through_the_triton_kernel(model, expected, record_property):
    with attention_impl("triton"), torch.no_grad():
        logits = model(expected["input_ids"]).logits
    err = (logits - expected["logits"]).abs().max().item()
    record_property("max_abs_diff", err)
    assert err < 1e-4, err


def test_packed_rows_equal_samples_alone_through_the_triton_kernel(model, expected):
    src = expected["input_ids"]
    samples = [src[0, :7], src[1, :5], src[2, :9], src[0, 10:16]]
    ids, seg = pack_rows(samples, row_length=16, pad_id=EOS)
    with torch.no_grad():
        with attention_impl("triton"):
            packed = model(ids, **packing_kwargs(seg)).logits
        for i, sample in enumerate(samples):
            alone = model(sample[None]).logits[0]  # the SDPA fallback, run on its own
            rows, cols = (seg == i).nonzero(as_tuple=True)
            torch.testing.assert_close(packed[rows, cols], alone, atol=2e-5, rtol=1e-5)


def test_gradients_through_the_triton_kernel_match_sdpa(model, expected):
    ids = expected["input_ids"][:2, :12]
    grads = []
    for impl in ("triton", "torch"):
        model.zero_grad()
        with attention_impl(impl):
            model(ids).logits.float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)
