"""The cost model (python -m tools.roofline): its FLOP and byte counts against formulas derived
by hand from the kernels' grids, tiles and loops, for two small configurations, and its report."""

from __future__ import annotations

import re

import pytest

from tools import roofline
from tools.roofline import (
    EFFICIENCY,
    attention_launches,
    masked_ce_launches,
    wave_quantization,
)
from vrpo_kernels.attention import sm90_config
from vrpo_kernels.gpus import GPU, GPUS
from vrpo_kernels.masked_linear_ce.triton_path import vocab_split

H100 = GPUS["h100"]
BF16 = 2


def _by_name(launches):
    return {x.name: x for x in launches}


def test_masked_ce_counts_one_wave():
    """n=300 rows, H=64, V=1000 on an H100: the forward's 3 row blocks x 8 vocabulary splits (one tile of
    128 each) fit one wave, so h, W and the targets are each read once; the backward is one chunk."""
    n, H, V = 300, 64, 1000
    launches = masked_ce_launches(n, H, V, H100)
    names = _by_name(launches)
    fwd = names["ce fwd: _lse_forward_kernel"]
    # 128 x 128 tiles, K in steps of 64: padded M = 3 * 128, padded V = 8 * 128.
    assert fwd.flops == 2 * (3 * 128) * (8 * 128) * 64
    assert fwd.bytes == n * H * BF16 + V * H * BF16 + n * 8 + 3 * 4 * n * 8  # h, W, targets; 3 partials x 8 splits
    tag = "ce bwd chunk 1/1 (1000 columns)"
    gemm = 2 * n * H * V
    assert names[f"{tag}: logits = h W^T"].flops == gemm
    assert names[f"{tag}: logits = h W^T"].bytes == n * H * BF16 + V * H * BF16 + n * V * 4
    assert names[f"{tag}: _softmax_grad_kernel"].flops == 0
    assert names[f"{tag}: _softmax_grad_kernel"].bytes == n * V * 4 + n * (8 + 4 + 4) + n * V * BF16
    assert names[f"{tag}: dW[chunk] = dz^T h"].bytes == n * V * BF16 + n * H * BF16 + V * H * BF16
    # One chunk: d_hidden written once, directly in bf16 (no fp32 accumulator, no final cast).
    assert names[f"{tag}: dH (+)= dz W[chunk]"].bytes == n * V * BF16 + V * H * BF16 + n * H * BF16
    assert sum(x.flops for x in launches) == fwd.flops + 3 * gemm
    assert "ce bwd: dH fp32 -> compute dtype" not in names


def test_masked_ce_forward_waves_and_chunks():
    """Same shape on a 2-SM GPU: the split that fills whole waves is 2 splits of 4 tiles (6 programs, 3
    waves: cost 12 tile-times, as 8 x 1 or 4 x 2, with fewer partials). Waves of 2 programs, row blocks
    fastest, enumerated by hand: h rows 256 + (44 + 128) + 172 = 600, W rows 512 + 1000 + 488 = 2000.
    A 1 MB budget makes vocabulary chunks of 768 and 232 columns."""
    n, H, V = 300, 64, 1000
    tiny = GPU("2 SMs", 1, 2, 1e12, 1e12, 1e12, 1e9)
    launches = masked_ce_launches(n, H, V, tiny, max_buffer_bytes=1 << 20)
    names = _by_name(launches)
    fwd = names["ce fwd: _lse_forward_kernel"]
    assert fwd.grid.startswith("(3, 2)")
    assert fwd.bytes == 600 * (H * BF16 + 8) + 2000 * H * BF16 + 3 * 4 * n * 2
    assert fwd.quantization == 1.0  # 6 programs in 3 full waves of 2
    cols = (1 << 20) // (4 * n) // 128 * 128
    assert cols == 768
    first, second = f"ce bwd chunk 1/2 ({cols} columns)", f"ce bwd chunk 2/2 ({V - cols} columns)"
    # Several chunks: d_hidden accumulates in fp32 (read and written by every chunk's GEMM); d_weight's
    # rows of each chunk are written once, in bf16: no [V, H] fp32 accumulator.
    assert names[f"{first}: dH (+)= dz W[chunk]"].bytes == n * cols * BF16 + cols * H * BF16 + 2 * n * H * 4
    assert names[f"{second}: dW[chunk] = dz^T h"].bytes == (V - cols) * n * BF16 + n * H * BF16 + (V - cols) * H * BF16
    assert names["ce bwd: dH fp32 -> compute dtype"].bytes == n * H * (4 + BF16)
    assert names["ce bwd: zero the fp32 dH accumulator"].bytes == n * H * 4


def test_forward_grid_fills_whole_waves():
    """LLaDA's head on an H100 (132 SMs, one 16-bit forward block each): 4096 rows are 32 row blocks
    and 988 vocabulary tiles; 33 splits of 30 tiles give 1056 programs, exactly 8 waves."""
    assert vocab_split(32, 988, 132) == (33, 30)
    for m_blocks, tiles, slots in ((32, 988, 132), (7, 988, 132), (1, 988, 264), (3, 8, 2), (40, 3, 132)):
        splits, per = vocab_split(m_blocks, tiles, slots)
        assert (splits - 1) * per < tiles <= splits * per  # every split non-empty
        cost = -(-m_blocks * splits // slots) * per
        # No other split is faster: the work of m_blocks * tiles tile-programs in whole waves.
        assert cost == min(-(-m_blocks * -(-tiles // p) // slots) * p for p in range(1, tiles + 1))
    assert wave_quantization(133, 132) == pytest.approx(264 / 133)


def test_attention_counts_gqa():
    """B=1, S=256, 2 query heads sharing 1 KV head, D=64 (Hopper tiles 128/64/64x128): every kernel
    fits one wave, so each operand is read once. FLOPs: forward 2 matmuls, dK/dV 4, dQ 3, each
    2*S*S*D per query head."""
    B, S, H, Hkv, D = 1, 256, 2, 1, 64
    cfg = sm90_config(D)
    assert (cfg.fwd.block_m, cfg.fwd.block_n, cfg.dkdv.block_m, cfg.dkdv.block_n) == (128, 64, 64, 128)
    names = _by_name(attention_launches(B, S, H, D, H100, n_kv_heads=Hkv))
    unit = 2 * B * H * S * S * D
    row = D * BF16
    q_bytes, kv_bytes, seg_bytes = B * H * S * row, B * Hkv * S * row, B * S * (4 + 8)  # seg + (lo, hi)
    stats = B * H * S * 4

    fwd = names["attn fwd: _attn_fwd (+LSE)"]
    assert fwd.flops == 2 * unit
    assert fwd.bytes == q_bytes + 2 * kv_bytes + seg_bytes + q_bytes + stats  # reads; out and LSE written
    delta = names["attn bwd: _attn_bwd_delta"]
    assert delta.flops == 0 and delta.bytes == 2 * q_bytes + stats
    dkdv = names["attn bwd: _attn_bwd_dkdv"]
    assert dkdv.flops == 4 * unit
    assert dkdv.bytes == 2 * kv_bytes + seg_bytes + 2 * q_bytes + 2 * stats + 2 * kv_bytes
    dq = names["attn bwd: _attn_bwd_dq"]
    assert dq.flops == 3 * unit
    assert dq.bytes == 2 * q_bytes + 2 * kv_bytes + seg_bytes + 2 * stats + q_bytes


def test_attention_ragged_sequence_pads_tiles():
    """S = 200 is not a multiple of the tiles: the FLOPs are those of the padded tiles that run."""
    S, D = 200, 64
    names = _by_name(attention_launches(1, S, 1, D, H100))
    # forward: 2 query tiles of 128 x 4 key tiles of 64, 2 matmuls each.
    assert names["attn fwd: _attn_fwd (+LSE)"].flops == 2 * 4 * 2 * (2 * 128 * 64 * D)


def test_report_last_line_and_goals(capsys):
    assert roofline.main(["--gpu", "h200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "989 TFLOP/s" in out[0] and "4.80 TB/s" in out[0] and "public peaks" in out[0]
    m = re.fullmatch(
        r"masked_ce predicted ([\d.]+) ms, ideal ([\d.]+) ms, ratio ([\d.]+); "
        r"attention predicted ([\d.]+) ms, ideal ([\d.]+) ms, ratio ([\d.]+)",
        out[-1],
    )
    assert m, out[-1]
    p, i, r, p2, i2, r2 = map(float, m.groups())
    assert i == pytest.approx(8 * 4096 * 4096 * 126464 / 989e12 * 1e3, rel=1e-3)
    assert i2 == pytest.approx(14 * 8 * 32 * 4096**2 * 128 / 989e12 * 1e3, rel=1e-3)
    assert r == pytest.approx(p / i, abs=0.01) and r2 == pytest.approx(p2 / i2, abs=0.01)
    assert r <= 1.5 and r2 <= 1.5
    # The expected times, beside the ideals, from the stated efficiencies: above the roofline totals.
    e = re.fullmatch(
        r"masked_ce expected ([\d.]+) ms \(an estimate\) beside ideal ([\d.]+) ms \(a floor\); "
        r"attention expected ([\d.]+) ms beside ideal ([\d.]+) ms",
        out[-2],
    )
    assert e, out[-2]
    ce_exp, ce_ideal, at_exp, at_ideal = map(float, e.groups())
    assert (ce_ideal, at_ideal) == (i, i2)
    assert ce_exp > p / max(EFFICIENCY.values()) * min(EFFICIENCY.values()) and at_exp >= p2
    assert any("expected:" in line and "(an estimate" in line for line in out)


def test_bad_shape_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        roofline.main(["--shape", "4096,4096"])
    assert "--shape takes 3 positive integers" in capsys.readouterr().err


def test_expected_time_of_a_launch():
    """expected = max(FLOPs / (peak x efficiency), bytes / (bandwidth x 90%)) x wave quantization: a
    cuBLAS GEMM of 133 output tiles (128 x 256) on 132 SMs runs 2 waves for 133 tiles' work."""
    m, n, k = 133 * 128, 256, 4096
    launch = roofline.gemm_launch("g", m, n, k, BF16, BF16, BF16, sms=132)
    assert launch.quantization == pytest.approx(264 / 133)
    compute = 2 * m * n * k / (H100.bf16_flops * EFFICIENCY["cublas"])
    memory = (m * k + k * n + m * n) * BF16 / (H100.bandwidth * EFFICIENCY["hbm"])
    assert launch.expected_seconds(H100) == pytest.approx(max(compute, memory) * 264 / 133)
    assert launch.seconds(H100) == pytest.approx(
        max(2 * m * n * k / H100.bf16_flops, (m * k + k * n + m * n) * BF16 / H100.bandwidth)
    )
