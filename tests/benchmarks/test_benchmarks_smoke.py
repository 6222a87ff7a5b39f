"""The kernel benchmarks run end to end at toy sizes, so that they cannot rot (no timing is asserted)."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import re
import shutil
import sys
import types

import torch

from benchmarks import kernels

HAS_PLOT = importlib.util.find_spec("matplotlib") is not None


def run_quick(tmp_path, op, impls):
    assert kernels.main(["--quick", "--ops", op, "--impls", ",".join(impls), "--out", str(tmp_path)]) == 0
    with open(tmp_path / f"kernels_{op}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == impls
    for r in rows:
        assert float(r["p20_s"]) <= float(r["median_s"]) <= float(r["p80_s"])
        assert float(r["peak_extra_mb"]) >= 0
    assert f"| {impls[-1]} |" in (tmp_path / f"kernels_{op}.md").read_text()
    assert (tmp_path / f"kernels_{op}.png").exists() == HAS_PLOT
    return rows


def test_masked_ce_benchmark_runs_at_toy_size(tmp_path):
    # torch.compile'd implementations are left out: their first compile alone takes tens of seconds.
    for r in run_quick(tmp_path, "masked_ce", ["eager", "eager_gathered", "vrpo_torch"]):
        assert float(r["max_err_out"]) < 1e-4 and float(r["max_err_grad"]) < 1e-4


def test_attention_benchmark_runs_at_toy_size(tmp_path):
    for r in run_quick(tmp_path, "attention", ["eager", "vrpo_torch"]):
        assert float(r["max_err_out"]) < 1e-5 and float(r["max_err_grad"]) < 1e-5
        assert "GFLOP/s useful" in r["note"]


def test_mask_sampling_benchmark_runs_at_toy_size(tmp_path):
    for r in run_quick(tmp_path, "mask_sampling", ["eager", "vrpo_torch"]):
        assert float(r["max_err_out"]) == 0  # no mask with a wrong count or outside the response


def test_masks_benchmark_runs_at_toy_size(tmp_path):
    for r in run_quick(tmp_path, "masks", ["per_row", "vrpo_torch"]):
        assert float(r["max_err_out"]) == 0  # every sample: its count, inside the response, mask token there


def test_masks_error_column_catches_bad_draws():
    x = kernels.Masks.make_inputs(dict(B=2, n=3, L=16), torch.int64, "cpu")
    noisy, masked, weight = kernels.Masks.impls("cpu")[1].setup(x)()
    assert kernels.Masks.errors((noisy, masked, weight), x) == (0.0, 0.0)
    outside = masked.clone()
    outside[0, 0] = ~x["response_mask"][0]
    assert kernels.Masks.errors((noisy, outside, weight), x)[0] == 1.0
    stale = noisy.clone()
    stale[1, 2] = x["input_ids"][1]  # the mask token not written
    assert kernels.Masks.errors((stale, masked, weight), x)[0] == 1.0
    off = weight.clone()
    off[0, 1] = off[0, 1] * (1 + 2**-20)  # past two float32 roundings
    assert kernels.Masks.errors((noisy, masked, off), x)[0] == 1.0


def test_mask_sampling_error_column_catches_bad_masks():
    x = kernels.MaskSampling.make_inputs(dict(B=2, n=3, L=16), torch.bool, "cpu")
    good = kernels.MaskSampling.impls("cpu")[0].setup(x)()
    assert kernels.MaskSampling.errors(good, x) == (0.0, 0.0)
    bad = good.clone()
    bad[0, 0] = ~x["response_mask"][0]  # outside the response
    assert kernels.MaskSampling.errors(bad, x)[0] == 1.0


def test_packing_and_flop_count():
    segment_ids = kernels.packed_segments(3, 64, 5, 20, seed=1)
    runs = kernels.segment_runs(segment_ids)
    for row, row_runs in zip(segment_ids.tolist(), runs):
        assert all(5 <= n <= 20 for _, n in row_runs)
        covered = sum(n for _, n in row_runs)
        assert all(x == -1 for x in row[covered:]) and all(x >= 0 for x in row[:covered])
        assert 64 - covered < 20  # packing stops only when the next sample does not fit
    pairs = sum(n * n for row_runs in runs for _, n in row_runs)
    assert kernels.useful_flops(segment_ids, n_heads=2, head_dim=16) == 14 * 16 * 2 * pairs


def test_flash_attn_glue_with_a_stand_in_kernel(monkeypatch):
    """The flash-attn row's glue (pack to [total, H, D], cu_seqlens, unpack), with a stand-in kernel.

    flash-attn needs a GPU; the stand-in runs each cu_seqlens segment through SDPA on the CPU, so the
    packing and unpacking the GPU benchmark relies on is checked against the float64 reference.
    """
    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert not causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        calls.append(cu_q.tolist())
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert b - a <= max_q
            seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n, D]
            outs.append(torch.nn.functional.scaled_dot_product_attention(*seg)[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    shape = dict(batch=2, seq_len=30, n_heads=3, head_dim=16, min_len=3, max_len=9)
    x = kernels.Attention.make_inputs(shape, torch.float32, "cpu")
    impl = {i.name: i for i in kernels.Attention.impls("cuda")}["flash_attn_varlen"]
    result = impl.setup(x)()
    lengths = torch.tensor([n for row in kernels.segment_runs(x["segment_ids"]) for _, n in row])
    assert calls[0] == [0] + lengths.cumsum(0).tolist()
    out_err, grad_err = kernels.Attention.errors(result, kernels.Attention.reference(x))
    assert out_err < 1e-5 and grad_err < 1e-5


def test_quick_runs_never_write_over_the_committed_results(tmp_path, capsys):
    from benchmarks.common import RESULTS, output_dir

    assert output_dir(tmp_path, quick=True) == tmp_path  # an explicit --out is used as given
    assert output_dir(RESULTS, quick=False) == RESULTS
    committed = {p.name: p.read_bytes() for p in RESULTS.glob("kernels_mask_sampling.*")}
    assert kernels.main(["--quick", "--ops", "mask_sampling", "--impls", "eager", "--no-memory"]) == 0
    assert {p.name: p.read_bytes() for p in RESULTS.glob("kernels_mask_sampling.*")} == committed
    written = re.search(r"--quick: results go to (\S+),", capsys.readouterr().err)
    assert written, "a --quick run without --out must say where its results went"
    folder = pathlib.Path(written.group(1))
    assert (folder / "kernels_mask_sampling.csv").exists()
    shutil.rmtree(folder)
