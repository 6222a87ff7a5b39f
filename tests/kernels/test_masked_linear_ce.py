"""masked_linear_ce against a float64 eager reference: values and gradients, every impl.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest) on tiny shapes with
fp32 and fp16, and in bf16 (with the tiles upcast right before tl.dot, see the bf16 test); the chunked
torch path is checked in fp32, fp16 and bf16.

Tolerances (absolute and relative, on outputs and gradients). The reference sees the same
low-precision inputs, upcast to float64, so only the implementation's own rounding counts:

* fp32: 1e-4. Both paths accumulate in fp32; logits here are O(1).
* fp16: 2e-3 on the output (fp32 accumulation of exactly-representable inputs), 1e-2 on the gradients,
  which are returned in fp16 (unit roundoff 4.9e-4) and, in the Triton kernels, are built from
  dZ tiles rounded to fp16 before the tl.dot.
* bf16 (torch path; the Triton path's bound is derived at its test): 2e-3 on the output (computed
  in fp32), 3e-2 on the gradients, returned in bf16 (unit roundoff 3.9e-3).
"""

from __future__ import annotations

import importlib
import weakref
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from vrpo.estimator import HeadOptions
from vrpo_kernels import masked_linear_ce

# The package re-exports the function under the package's name, so fetch the path modules themselves.
torch_path = importlib.import_module("vrpo_kernels.masked_linear_ce.torch_path")
triton_path = importlib.import_module("vrpo_kernels.masked_linear_ce.triton_path")

TOL = {
    torch.float32: dict(out=1e-4, grad=1e-4),
    torch.float16: dict(out=2e-3, grad=1e-2),
    torch.bfloat16: dict(out=2e-3, grad=3e-2),
}
DTYPES = {"triton": [torch.float32, torch.float16], "torch": [torch.float32, torch.float16, torch.bfloat16]}
CASES = [(impl, dt) for impl in ("triton", "torch") for dt in DTYPES[impl]]


def make_inputs(N, H, V, dtype, *, bias=True, select=0.5, seed=0, dup_targets=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.full((N,), V // 3) if dup_targets else torch.randint(0, V, (N,), generator=g)
    row_weight = torch.rand(N, generator=g) * 3
    mask = torch.rand(N, generator=g) < select
    cot = torch.randn(N, generator=g)
    return hidden, weight, b, targets, row_weight, mask, cot


def reference64(hidden, weight, b, targets, row_weight, mask, cot):
    """float64 eager values and gradients (hidden, weight, bias), full logits."""
    ins = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((b,) if b is not None else ())]
    logits = ins[0] @ ins[1].T + (ins[2] if b is not None else 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    out = torch.where(mask, logp * row_weight.double(), torch.zeros_like(logp))
    grads = torch.autograd.grad((out * cot.double()).sum(), ins)
    return out, grads


def run(impl, hidden, weight, b, targets, row_weight, mask, cot, selector=None, max_buffer_bytes=None):
    ins = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((b,) if b is not None else ())]
    out = masked_linear_ce(
        ins[0],
        ins[1],
        targets,
        row_weight,
        mask if selector is None else selector,
        ins[2] if b is not None else None,
        impl=impl,
        max_buffer_bytes=max_buffer_bytes,
    )
    assert out.dtype == torch.float32 and out.shape == (hidden.shape[0],)
    grads = torch.autograd.grad((out * cot).sum(), ins, allow_unused=True)
    for g, t in zip(grads, ins):
        assert g is not None and g.dtype == t.dtype and g.shape == t.shape
    return out, grads


def check(impl, dtype, N, H, V, max_buffer_bytes=None, **kw):
    args = make_inputs(N, H, V, dtype, **kw)
    ref_out, ref_grads = reference64(*args)
    out, grads = run(impl, *args, max_buffer_bytes=max_buffer_bytes)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol["out"], rtol=tol["out"])
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol["grad"], rtol=tol["grad"], msg=lambda m: f"d_{name}: {m}")
    return out, grads


@pytest.mark.parametrize("impl,dtype", CASES)
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((1, 7, 50), dict(select=1.0)),  # N = 1
        ((9, 19, 100), {}),  # odd H, V not a multiple of the vocab block
        ((12, 16, 64), dict(select=0.0)),  # no row selected
        ((16, 24, 90), dict(select=1.0)),  # all rows selected
        ((13, 8, 70), dict(dup_targets=True, select=1.0)),  # every row has the same target
        ((10, 12, 40), dict(bias=False)),
    ],
    ids=["N1", "oddH-raggedV", "none-selected", "all-selected", "dup-targets", "no-bias"],
)
def test_matches_float64_reference(impl, dtype, shape, kw):
    check(impl, dtype, *shape, **kw)


# bfloat16 on the Triton path in the interpreter: the forward kernel upcasts its tiles right before
# tl.dot (the interpreter's bf16 dot is wrong: log p off by ~1e10 without it), so every bf16 load and
# rounding runs as on the GPU. Bounds, with u = 2^-8 (bf16 unit roundoff) and the reference on the
# same bf16 inputs in float64:
# * log p: the forward rounds nothing to bf16 (fp32 sums of exact bf16 products, fp32 log-sum-exp),
#   so it meets the fp32 tolerance; one logit rounded to bf16 (u * |logit|, ~1e-2 here) would not.
# * gradients: dz = g (onehot - softmax) is computed in fp32 and stored as bf16 (a relative error of u
#   per entry on the GPU, which rounds to nearest; 2u in the interpreter, whose fp32 -> bf16 cast
#   truncates), the GEMMs accumulate its exact products with the bf16 operand in fp32, and torch rounds
#   the result to bf16 (u / 2 of |result|). So |error| <= 2.5u * sum |dz| |operand| elementwise (e.g.
#   (|dz| @ |W|) for d_hidden), plus fp32 terms ~1e-5 times smaller; the test allows 3u times it.
BF16_U = 2.0**-8


def _abs_grad_terms(hidden, weight, b, targets, row_weight, mask, cot):
    """float64 sum |dz| |operand| for d_hidden, d_weight, d_bias (the bound's scale, see above)."""
    h, w = hidden.double(), weight.double()
    logits = h @ w.T + (b.double() if b is not None else 0)
    onehot = torch.nn.functional.one_hot(targets, w.shape[0]).double()
    g = torch.where(mask, cot.double() * row_weight.double(), torch.zeros_like(cot, dtype=torch.float64))
    dz = (g[:, None] * (onehot - torch.softmax(logits, -1))).abs()
    return dz @ w.abs(), dz.T @ h.abs(), dz.sum(0)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "shape,kw", [((9, 19, 100), {}), ((10, 12, 40), dict(bias=False, select=1.0))], ids=["oddH-raggedV", "no-bias"]
)
def test_triton_bfloat16_matches_reference(shape, kw):
    args = make_inputs(*shape, torch.bfloat16, **kw)
    ref_out, ref_grads = reference64(*args)
    out, grads = run("triton", *args)
    tol = TOL[torch.float32]["out"]
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=tol, rtol=tol)
    for name, g, r, terms in zip(("hidden", "weight", "bias"), grads, ref_grads, _abs_grad_terms(*args)):
        assert g.dtype == torch.bfloat16
        err = (g.double() - r).abs()
        worst = int((err - 3 * BF16_U * terms).argmax())
        assert (err <= 3 * BF16_U * terms).all(), (
            f"d_{name}: error {float(err.flatten()[worst]):.3g} above 3u * {float(terms.flatten()[worst]):.3g}"
        )


@pytest.mark.interpreter
def test_triton_vocab_splits_with_padding_tiles():
    # V = 200 spans 7 tiles of 32 in 4 splits of 2: the last split ends on a tile past V, whose
    # -inf logits must not turn the running logsumexp into NaN.
    splits, per_split = triton_path.vocab_split(1, 7, triton_path.wave_slots(torch.device("cpu"), torch.float32))
    assert (splits, per_split) == (4, 2)
    check("triton", torch.float32, 5, 9, 200)


@pytest.mark.parametrize("gemm", ["onednn", "mm"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept-logits", "recomputed"])
def test_torch_path_across_row_and_vocab_chunks(monkeypatch, gemm, keep):
    if gemm == "onednn" and not torch_path._onednn_agrees():
        pytest.skip("this torch build has no oneDNN fp32 GEMM; the torch.mm case covers the path")
    monkeypatch.setattr(torch_path, "_CPU_GEMM", gemm)
    monkeypatch.setattr(torch_path, "_MAX_CHUNK_ROWS", 4)
    monkeypatch.setattr(torch_path, "_CHUNK_ELEMS", 4 * 256)
    monkeypatch.setattr(torch_path, "_KEPT_CHUNK_ELEMS", 15 * 256)
    assert torch_path._chunks(15, 700, 1 << 30) == (4, 256)  # 4 row chunks x 3 vocab chunks, both ragged
    assert torch_path._chunks(15, 700, 1 << 30, all_rows=True) == (15, 256)  # kept: all rows, 3 vocab chunks
    # 15 rows x 700 vocab fp32 = 42,000 bytes: kept within 1 MB, recomputed under 40,000 bytes.
    budget = (1 << 20) if keep else 40_000
    assert torch_path._keeps_logits(15, 700, budget) is keep
    for dtype in (torch.float32, torch.bfloat16):
        for bias in (True, False):
            check("torch", dtype, 15, 11, 700, bias=bias, max_buffer_bytes=budget)


def test_cpu_gemm_choice_is_cached_untimed_and_logs_a_lost_fast_path(monkeypatch, caplog):
    monkeypatch.setattr(torch_path, "_CPU_GEMM", None)
    monkeypatch.delenv("VRPO_CPU_GEMM", raising=False)
    first = torch_path._cpu_gemm()
    # oneDNN wherever it works, whatever the timings: a timed choice made contending runs differ.
    assert first == ("onednn" if torch_path._onednn_agrees() else "mm") and torch_path._cpu_gemm() is first
    monkeypatch.setattr(torch_path, "_CPU_GEMM", None)
    monkeypatch.setenv("VRPO_CPU_GEMM", "mm")
    assert torch_path._cpu_gemm() == "mm"

    def broken():
        raise RuntimeError("no mkldnn")

    monkeypatch.setattr(torch_path, "_CPU_GEMM", None)
    monkeypatch.setenv("VRPO_CPU_GEMM", "onednn")
    monkeypatch.setattr(torch_path, "_onednn_agrees", broken)
    with caplog.at_level("WARNING", logger="vrpo_kernels.masked_linear_ce.torch_path"):
        assert torch_path._cpu_gemm() == "mm"
    assert "oneDNN" in caplog.text and "no mkldnn" in caplog.text


@settings(max_examples=12)
@given(
    N=st.integers(1, 16),
    H=st.integers(1, 32),
    V=st.integers(2, 100),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    bias=st.booleans(),
    select=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
    chunk_rows=st.sampled_from([None, 1, 3]),
)
def test_triton_random_shapes(N, H, V, dtype, bias, select, seed, chunk_rows):
    # chunk_rows: a budget of that many fp32 logit rows, so the backward runs row chunks in order and
    # accumulates d_weight across them (None: the default budget, one chunk).
    budget = None if chunk_rows is None else 4 * V * chunk_rows
    check("triton", dtype, N, H, V, bias=bias, select=select, seed=seed, max_buffer_bytes=budget)


@settings(max_examples=20)
@given(
    N=st.integers(1, 40),
    H=st.integers(1, 48),
    V=st.integers(2, 600),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    bias=st.booleans(),
    select=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(["kept", "recomputed"]),
    small=st.booleans(),
)
def test_torch_random_shapes(N, H, V, dtype, bias, select, seed, path, small):
    # kept: the default budget holds the softmax numerators (two backward GEMMs per chunk). recomputed:
    # a 1-byte budget forces the streamed path. small: 256-vocab chunks (3 rows each when recomputed),
    # so the online logsumexp and the accumulation across chunks run on these small shapes too.
    budget = None if path == "kept" else 1
    with (
        mock.patch.object(torch_path, "_MAX_CHUNK_ROWS", 3 if small else torch_path._MAX_CHUNK_ROWS),
        mock.patch.object(torch_path, "_CHUNK_ELEMS", 3 * 256 if small else torch_path._CHUNK_ELEMS),
        mock.patch.object(torch_path, "_KEPT_CHUNK_ELEMS", N * 256 if small else torch_path._KEPT_CHUNK_ELEMS),
    ):
        check("torch", dtype, N, H, V, bias=bias, select=select, seed=seed, max_buffer_bytes=budget)


@pytest.mark.parametrize("impl", ["triton", "torch", "eager"])
def test_bool_mask_and_index_selector_agree(impl):
    args = make_inputs(11, 10, 60, torch.float32)
    hidden, weight, b, targets, row_weight, mask, cot = args
    index = mask.nonzero()[:, 0].int()  # any integer dtype
    out_mask, g_mask = run(impl, *args)
    out_idx, g_idx = run(impl, *args, selector=index)
    torch.testing.assert_close(out_idx, out_mask, rtol=0, atol=0)
    for a, c in zip(g_idx, g_mask):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def _find_node(node, attr):
    """The first autograd node upstream of ``node`` (breadth first) that has the attribute ``attr``."""
    queue = [node]
    while queue:
        node = queue.pop(0)
        if hasattr(node, attr):
            return node
        queue += [nxt for nxt, _ in node.next_functions if nxt is not None]
    raise AssertionError(f"no autograd node with {attr!r}")


def _count_saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_grad_saves_nothing_and_grad_saves_within_budget(impl):
    N, H, V = 12, 8, 96
    hidden, weight, b, targets, row_weight, mask, _ = make_inputs(N, H, V, torch.float32, select=1.0)
    hidden.requires_grad_()
    weight.requires_grad_()

    def call(budget=None):
        return masked_linear_ce(hidden, weight, targets, row_weight, mask, b, impl=impl, max_buffer_bytes=budget)

    with torch.no_grad():
        out, saved = _count_saved(call)
    assert out.grad_fn is None and not out.requires_grad
    assert saved == []
    # A budget below the logits' size: what is kept is O(N * H + V * H) (inputs and a per-row
    # logsumexp), never the logits.
    out, saved = _count_saved(lambda: call(N * V * 4 - 1))
    assert out.grad_fn is not None
    assert saved and all(t.numel() < N * V for t in saved), [tuple(t.shape) for t in saved]
    # The default budget: the torch path keeps the softmax numerators [V, N] (one GEMM fewer in the
    # backward) on the autograd node, and its backward frees them; the Triton path never keeps them.
    out, saved = _count_saved(call)
    assert all(t.numel() < N * V for t in saved)
    kept = _find_node(out.grad_fn, "kept")  # the op's autograd node
    chunks = kept.kept.chunks if kept.kept is not None else []
    assert [tuple(c.shape) for c in chunks] == ([(V, N)] if impl == "torch" else [])
    out.sum().backward()
    assert kept.kept is None


def test_second_backward_through_kept_softmax_is_a_clear_error():
    hidden, weight, b, targets, row_weight, mask, _ = make_inputs(6, 5, 40, torch.float32, select=1.0)
    hidden.requires_grad_()
    out = masked_linear_ce(hidden, weight, targets, row_weight, mask, b, impl="torch")
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*max_buffer_bytes"):
        out.sum().backward()
    # With a budget below the logits' size nothing is kept, and retain_graph works as usual.
    out = masked_linear_ce(hidden, weight, targets, row_weight, mask, b, impl="torch", max_buffer_bytes=6 * 40 * 4 - 1)
    out.sum().backward(retain_graph=True)
    out.sum().backward()


def test_row_weight_gradient():
    hidden, weight, b, targets, row_weight, mask, cot = make_inputs(9, 5, 20, torch.float32)
    rw = row_weight.clone().requires_grad_()
    out = masked_linear_ce(hidden, weight, targets, rw, mask, b, impl="torch")
    (g,) = torch.autograd.grad((out * cot).sum(), rw)
    unweighted = masked_linear_ce(hidden, weight, targets, torch.ones(9), mask, b, impl="eager")
    torch.testing.assert_close(g, unweighted * cot)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hidden=torch.randn(4, 5, 6)), "hidden must be"),
        (dict(weight=torch.randn(20, 4)), "weight must be"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), "targets must be"),
        (dict(targets=torch.full((4,), 20)), "targets of selected rows"),
        (dict(row_weight=torch.ones(5)), "row_weight must be"),
        (dict(row_mask=torch.ones(5, dtype=torch.bool)), "row_mask"),
        (dict(row_mask=torch.tensor([0, 7])), "row_mask indexes rows outside"),
        (dict(row_mask=torch.tensor([1, 1])), "more than once"),
        (dict(row_mask=torch.ones(4)), "row_mask must be"),
        (dict(bias=torch.zeros(19)), "bias must be"),
        (dict(impl="cuda"), "impl="),
        (dict(max_buffer_bytes=0), "max_buffer_bytes"),
        (dict(max_buffer_bytes=1.5e9), "max_buffer_bytes"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    kw = dict(
        hidden=torch.randn(4, 5),
        weight=torch.randn(20, 5),
        targets=torch.zeros(4, dtype=torch.long),
        row_weight=torch.ones(4),
        row_mask=torch.ones(4, dtype=torch.bool),
        bias=None,
        impl="torch",
    )
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        masked_linear_ce(**kw)


def tiny_llama(vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.interpreter
def test_elbo_through_the_triton_kernel_matches_generic_path():
    from vrpo import SamplingPlan, draw_masks, elbo_terms

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 39, (2, 8), generator=g)
    resp = torch.zeros(2, 8, dtype=torch.bool)
    resp[0, 3:] = True
    resp[1, 5:7] = True
    draw = draw_masks(resp, SamplingPlan(n_t=2, n_yt=1), generator=g)
    results = []
    for kwargs in (dict(head=HeadOptions(fused=False)), dict(head=HeadOptions(fused=True, impl="triton"))):
        model.zero_grad()
        terms = elbo_terms(model, ids, resp, draw, 39, **kwargs)
        terms.sum().backward()
        results.append((terms.detach(), [p.grad.clone() for p in model.parameters()]))
    (generic, g_generic), (fused, g_fused) = results
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_fused, g_generic):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def _small_chunks(monkeypatch, n_rows):
    """256-vocab chunks on the torch path, 4 rows each when recomputed, all ``n_rows`` when kept."""
    monkeypatch.setattr(torch_path, "_MAX_CHUNK_ROWS", 4)
    monkeypatch.setattr(torch_path, "_CHUNK_ELEMS", 4 * 256)
    monkeypatch.setattr(torch_path, "_KEPT_CHUNK_ELEMS", n_rows * 256)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_huge_logits_in_a_late_vocab_chunk(monkeypatch, impl):
    # The torch path shifts each chunk by the running log-sum-exp; a logit ~300 above it in the last
    # chunk overflows that shift and must take the max-shifted path. Logits are large but finite.
    _small_chunks(monkeypatch, 6)
    hidden, weight, b, targets, row_weight, mask, cot = make_inputs(6, 8, 600, torch.float32, select=1.0)
    weight[590] = hidden[2] / hidden[2].norm() ** 2 * 300  # row 2's logit for token 590 is ~300
    weight[5] = -hidden[3] / hidden[3].norm() ** 2 * 300  # and a very negative one early on
    targets[2], targets[4] = 590, 590
    args = (hidden, weight, b, targets, row_weight, mask, cot)
    ref_out, ref_grads = reference64(*args)
    out, grads = run(impl, *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-3, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_deterministic(impl):
    """The same call gives the same bits.

    Under TRITON_INTERPRET=1 the Triton programs run one after another, so a race between them cannot
    show here: for the Triton path the bit-equality can only fail on a GPU run, where this test is
    kept for that reason. What can fail here is the usual cause of such races: the module's kernels
    must accumulate without atomics.
    """
    import inspect
    import re

    args = make_inputs(14, 10, 90, torch.float32, dup_targets=True, select=1.0)
    (out1, g1), (out2, g2) = run(impl, *args), run(impl, *args)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    if impl == "triton":
        atomics = re.findall(r"\btl\.atomic_\w+\(", inspect.getsource(triton_path))
        assert not atomics, f"a kernel accumulates with atomics: {atomics}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_first_vocab_tile_all_minus_inf(monkeypatch, impl):
    # A -inf bias on padded vocabulary: when a row's first vocab tile (Triton) or chunk (torch) is all
    # -inf, a running max that starts at -inf gives exp(-inf - -inf) = NaN. Targets avoid the -inf ids.
    _small_chunks(monkeypatch, 7)
    hidden, weight, b, targets, row_weight, mask, cot = make_inputs(7, 8, 600, torch.float32, select=1.0)
    b[:300] = float("-inf")  # the interpreter's first vocab tiles and the torch path's first chunk
    targets = 300 + targets % 300
    args = (hidden, weight, b, targets, row_weight, mask, cot)
    ref_out, ref_grads = reference64(*args)
    out, grads = run(impl, *args)
    assert torch.isfinite(out).all()
    tol = TOL[torch.float32]
    torch.testing.assert_close(out.double(), ref_out, atol=tol["out"], rtol=tol["out"])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol["grad"], rtol=tol["grad"])


@pytest.mark.parametrize("budget", [None, 512 * 300 * 4 - 1], ids=["kept", "recomputed"])
def test_torch_path_deterministic_with_threads_and_shared_targets(budget):
    # 512 rows x 128 hidden with 3 distinct targets: a scatter of the one-hot part into d_weight by
    # index_put_(accumulate=True) adds atomically from several threads once the index holds >= 32768
    # elements, so its rounding changed from call to call (what made two CPU training runs differ).
    # Two threads even where the suite runs one per pytest-xdist worker: the race needs them.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() >= 2, "needs two threads to race"
        g = torch.Generator().manual_seed(0)
        args = make_inputs(512, 128, 300, torch.float32, select=1.0, bias=True)
        targets = torch.randint(0, 3, (512,), generator=g)
        args = args[:3] + (targets,) + args[4:]
        (out1, g1), *rest = [run("torch", *args, max_buffer_bytes=budget) for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    for out, grads in rest:
        assert torch.equal(out, out1)
        assert all(torch.equal(a, b) for a, b in zip(grads, g1))


# --------------------------------------------------------------------------------------------------
# The backward's GEMM forms (vrpo_kernels.masked_linear_ce.gemm), driven on the CPU
# --------------------------------------------------------------------------------------------------

gemm = importlib.import_module("vrpo_kernels.masked_linear_ce.gemm")
# The forms this CPU torch runs (the out_dtype overloads are CUDA-only in every torch so far).
CPU_PRODUCTS = ("upcast",)
CPU_ACCUMULATES = ("scratch16_add", "upcast_add")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_forms_at_the_backward_call_shapes(dtype):
    """Each form against float64 on the layouts the backward passes: the logits product h [n, H] @
    W[chunk].T into a view of the fp32 buffer, and the d_hidden accumulation of dz (a 16-bit view of the
    buffer, row stride 2C) @ W[chunk] into fp32, over three chunks. Bound: fp32 accumulation (2^-24 * K
    per step, relative to sum |a||b|), plus for scratch16_add one rounding of each chunk's partial to
    the 16-bit dtype (u * sum over the chunk of |a||b|)."""
    n, H, V, C = 37, 300, 5000, 2048  # 3 chunks, the last ragged; V > UPCAST_COLS: "upcast" runs 2 blocks
    assert V > gemm.UPCAST_COLS
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(n, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) / 8).to(dtype)
    u = torch.finfo(dtype).eps / 2
    for kind in CPU_PRODUCTS:
        z = torch.full((n * V + 7,), float("nan"))[: n * V].view(n, V)
        gemm.product(kind, h, W.T, z)
        ref = h.double() @ W.double().T
        assert ((z.double() - ref).abs() <= 2**-24 * H * (h.double().abs() @ W.double().abs().T)).all(), kind
    for kind in CPU_ACCUMULATES:
        acc = torch.zeros(n, H)
        ref, scale = torch.zeros(n, H, dtype=torch.float64), torch.zeros(n, H, dtype=torch.float64)
        for v0 in range(0, V, C):
            w = W[v0 : v0 + C]
            buf = torch.randn(n * w.shape[0], generator=g)
            dz = buf.view(n, w.shape[0]).view(dtype)[:, : w.shape[0]]  # real layout: stride 2C
            dz.copy_(torch.randn(n, w.shape[0], generator=g).to(dtype))
            gemm.accumulate(kind, dz, w, acc)
            ref += dz.double() @ w.double()
            scale += dz.double().abs() @ w.double().abs()
        chunk_rounding = u if kind == "scratch16_add" else 0.0
        bound = (2**-24 * V + chunk_rounding) * scale + 2**-24 * ref.abs()
        assert ((acc.double() - ref).abs() <= bound).all(), kind


def test_gemm_detection_refuses_what_this_torch_lacks(monkeypatch, caplog):
    """Feature detection, not version strings: on this CPU torch the out_dtype overloads raise, so the
    probe falls back, logs its choice at INFO, and the chosen forms agree with float64. A torch whose
    forms disagree (a broken overload) is refused too."""
    for dtype in (torch.bfloat16, torch.float16):
        with caplog.at_level("INFO", logger="vrpo_kernels.masked_linear_ce.gemm"):
            chosen = gemm.detect(torch.device("cpu"), dtype)
        assert chosen == gemm.GemmStrategy("upcast", "scratch16_add")
        assert "out_dtype" in caplog.text and "refused" in caplog.text
    real = gemm.accumulate

    def wrong_scratch16(kind, a, b, out):
        if kind == "scratch16_add":  # a form that silently drops the accumulator
            out.copy_(a @ b)
        else:
            real(kind, a, b, out)

    monkeypatch.setattr(gemm, "accumulate", wrong_scratch16)
    assert gemm.detect(torch.device("cpu"), torch.bfloat16).accumulate == "upcast_add"
    monkeypatch.setattr(gemm, "_CHOSEN", {})
    cpu = torch.device("cpu")
    assert gemm.strategy_for(cpu, torch.bfloat16) is gemm.strategy_for(cpu, torch.bfloat16)  # probed once
    with pytest.raises(ValueError, match="not one of"):
        gemm.product("mm", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))


@pytest.mark.interpreter
@pytest.mark.parametrize("product", CPU_PRODUCTS)
@pytest.mark.parametrize("accumulate", CPU_ACCUMULATES)
def test_triton_backward_each_gemm_form_across_vocab_chunks(monkeypatch, product, accumulate):
    """The whole op with each GEMM form forced, bf16, a budget of 128 columns x 9 rows: V = 300 runs in
    three vocabulary chunks (128, 128, 44), so d_hidden accumulates in fp32 across chunks. Bound: the
    bf16 one above (3u) plus one rounding of each chunk's d_hidden partial for scratch16_add (u/2)."""
    monkeypatch.setattr(gemm, "_CHOSEN", {("cpu", torch.bfloat16): gemm.GemmStrategy(product, accumulate)})
    args = make_inputs(9, 19, 300, torch.bfloat16, select=1.0)
    budget = 4 * 9 * 128
    assert len(triton_path.vocab_chunks(300, triton_path.grad_chunk_cols(9, 300, budget))) == 3
    ref_out, ref_grads = reference64(*args)
    out, grads = run("triton", *args, max_buffer_bytes=budget)
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-4, rtol=1e-4)
    units = 3.5 if accumulate == "scratch16_add" else 3.0
    for name, g, r, terms in zip(("hidden", "weight", "bias"), grads, ref_grads, _abs_grad_terms(*args)):
        err = (g.double() - r).abs()
        assert (err <= units * BF16_U * terms).all(), f"d_{name}: max error {float(err.max()):.3g}"


# --------------------------------------------------------------------------------------------------
# TF32 follows torch's setting; the forward grid fills waves
# --------------------------------------------------------------------------------------------------


class _LaunchSpy:
    """Stands in for a jit kernel: records each launch's keyword arguments and runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.interpreter
def test_fp32_triton_forward_follows_allow_tf32(monkeypatch):
    """impl="triton" with fp32 operands must not run TF32 dots while torch.backends.cuda.matmul.allow_tf32
    is False (torch's own default): the forward's DOT_PRECISION follows the flag."""
    spy = _LaunchSpy(triton_path._lse_forward_kernel)
    monkeypatch.setattr(triton_path, "_lse_forward_kernel", spy)
    args = make_inputs(5, 8, 70, torch.float32, select=1.0)
    # Set and restored by hand: torch's cuBLAS flags object is not a plain attribute holder, and some pytest
    # versions' monkeypatch cannot undo a setattr on it.
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allowed, want in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allowed
            assert triton_path.dot_precision(torch.float32) == want
            run("triton", *args)
            assert spy.calls[-1]["DOT_PRECISION"] == want
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert triton_path.dot_precision(torch.bfloat16) == "tf32"  # 16-bit values are exact in TF32


# --------------------------------------------------------------------------------------------------
# Memory: what the op allocates against working_set_bytes (the planner's figure)
# --------------------------------------------------------------------------------------------------

memory = importlib.import_module("vrpo_kernels.masked_linear_ce.memory")


class _Allocations(TorchDispatchMode):
    """Live bytes of the storages that ops create while the mode is on (never the ``known`` inputs'),
    freed when the storage dies; ``peak`` is their maximum, ``sizes`` every allocation's bytes."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live, self.now, self.peak, self.sizes = {}, 0, 0, []

    def _free(self, ptr):
        self.now -= self.live.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.live and ptr not in self.known:
                    self.live[ptr] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    self.sizes.append(storage.nbytes())
                    weakref.finalize(storage, self._free, ptr)
        return out


def _measure(dtype, weight_dtype, budget, N=64, n=48, H=32, V=700):
    """Peak bytes a forward + backward of impl="triton" allocates (bf16 under autocast when the weight
    is fp32 and ``dtype`` is 16-bit), and every allocation's size."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(torch.float32 if weight_dtype != dtype else dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(weight_dtype).requires_grad_()
    targets, rw = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:n] = True
    gemm.strategy_for(torch.device("cpu"), torch.bfloat16)  # the probe's own tensors are not the op's
    tracker = _Allocations((hidden, weight, targets, rw, mask))
    with tracker:
        with torch.autocast("cpu", dtype=dtype, enabled=weight_dtype != dtype):
            out = masked_linear_ce(hidden, weight, targets, rw, mask, impl="triton", max_buffer_bytes=budget)
        out.sum().backward()
    return tracker


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype,weight_dtype,budget",
    [
        (torch.bfloat16, torch.bfloat16, 4 * 48 * 128),  # 6 vocabulary chunks: the fp32 d_hidden accumulator
        (torch.bfloat16, torch.float32, 4 * 48 * 128),  # autocast with an fp32 master head: its cast, fp32 grads
        (torch.float32, torch.float32, None),  # one chunk
    ],
    ids=["bf16-chunks", "autocast-fp32-master", "fp32-one-chunk"],
)
def test_working_set_matches_allocated_bytes(dtype, weight_dtype, budget):
    """working_set_bytes (what vrpo.plan adds for the head) against the bytes the op actually allocates
    on the CPU: an upper bound, within 10% plus its small terms. N = 64 rows, 48 selected, H = 32, V = 700."""
    N, n, H, V = 64, 48, 32, 700
    tracker = _measure(dtype, weight_dtype, budget)
    splits = triton_path.vocab_split(-(-n // 16), -(-V // 32), triton_path.wave_slots(torch.device("cpu"), dtype))[0]
    ws = memory.working_set_bytes(
        N,
        n,
        H,
        V,
        dtype,
        weight_dtype=weight_dtype,
        hidden_dtype=torch.float32 if weight_dtype != dtype else dtype,
        max_buffer_bytes=budget,
        strategy=gemm.strategy_for(torch.device("cpu"), torch.bfloat16),
        splits=splits,
    )
    # The O(N + n + splits n) terms (outputs, the forward's per-split partials) may or may not be alive at
    # the peak: Triton 3.9's interpreter holds its last launch's arguments, 3.2's does not.
    assert tracker.peak <= ws.total <= 1.1 * tracker.peak + ws.small, (tracker.peak, ws)


@pytest.mark.interpreter
def test_multi_chunk_bf16_backward_holds_no_fp32_head_sized_tensor():
    """The memory bound of a multi-chunk backward: with a bf16 head (no autocast) nothing [V, H] in fp32
    is allocated (a row-chunked backward accumulated d_weight in fp32 and cast it at the end: 6 VH bytes
    beside the buffer, 4.1 GB more than max_buffer_bytes at LLaDA's head)."""
    V, H = 700, 32
    tracker = _measure(torch.bfloat16, torch.bfloat16, 4 * 48 * 128)
    assert max(tracker.sizes) < 4 * V * H, sorted(tracker.sizes)[-3:]


def test_working_set_at_lladas_head_and_what_a_planner_adds():
    """At LLaDA's head (H = 4096, V = 126,464), 4096 selected rows, the default 1 GiB budget: two
    vocabulary chunks, so the fp32 d_hidden accumulator (64 MiB) and no [V, H] fp32 one; ``transient``
    leaves out weight.grad when the op's own d_weight becomes it (a bf16 head), not when autocast's cast
    makes it afterwards (an fp32 master: the bf16 cast of the head and d_weight are then transients)."""
    n, N, H, V = 4096, 8192, 4096, 126464
    bf16 = memory.working_set_bytes(N, n, H, V, torch.bfloat16)
    assert bf16.buffer == 4 * n * 65536 <= 1 << 30
    assert bf16.accumulators >= 4 * n * H and bf16.total < (1 << 30) + 2 * V * H + (1 << 29)
    assert bf16.total - bf16.transient == V * H * 2
    master = memory.working_set_bytes(N, n, H, V, torch.bfloat16, weight_dtype=torch.float32)
    assert master.param_grads == V * H * 4 and master.transient >= (1 << 30) + 2 * V * H * 2
    frozen = memory.working_set_bytes(N, n, H, V, torch.bfloat16, weight_grad=False)
    assert frozen.total == frozen.transient < bf16.total - V * H * 2 + 1
