"""Ahead-of-time compilation of every kernel configuration for Hopper (sm_90), no GPU needed.

Runs ``python -m tools.aot_report`` in a fresh process (the real Triton compiler, not the
interpreter that conftest switches on) and checks its sm_90 resource report: every configuration
compiles, spills nothing and fits Hopper's 227 KB of shared memory per block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.aot_report import (
    HOPPER_SHARED_LIMIT,
    KERNEL_MODULES,
    bundled_ptxas,
    collect_specs,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def report():
    if bundled_ptxas() is None:
        pytest.skip("triton's bundled ptxas for sm_90 is absent (triton/backends/nvidia/bin): cannot assemble PTX")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "tools.aot_report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    return run


def test_every_configuration_compiles_for_sm90_without_spills(report):
    lines = report.stdout.strip().splitlines()
    assert report.returncode == 0, report.stdout[-4000:] + report.stderr[-4000:]
    last = re.fullmatch(r"(\d+) configurations, max registers (\d+), spill bytes (\d+), max shared (\d+)", lines[-1])
    assert last, lines[-1]
    n, regs, spills, shared = map(int, last.groups())
    assert spills == 0
    assert 0 < shared <= HOPPER_SHARED_LIMIT
    assert 0 < regs <= 255
    # Every kernel module contributes configurations (an empty aot_specs() would let a module's
    # kernels go unchecked), and every configuration is in the report once, each with status ok.
    per_module = {module: collect_specs((module,)) for module in KERNEL_MODULES}
    assert all(per_module.values()), {m: len(s) for m, s in per_module.items()}
    names = [s["name"] for specs in per_module.values() for s in specs]
    assert len(set(names)) == len(names), "configuration names must be unique"
    assert n == len(names) == len(collect_specs())
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in names}
    assert set(rows) == set(names)
    for name, cols in rows.items():
        assert cols[-1] == "ok", name
        assert int(cols[4]) == 0, name  # spill bytes
    # The attention configurations the dispatch uses on an H100 are all there.
    for kernel in ("attn_fwd_lse", "attn_fwd_nolse", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq"):
        for tag in ("d64_fp16", "d64_bf16", "d128_fp16", "d128_bf16"):
            assert f"{kernel}_{tag}" in rows


def test_ptxas_report_parsing_and_verdicts():
    from tools.aot_report import Report, parse_ptxas

    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    48 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n"
    )
    assert parse_ptxas(log) == dict(registers=255, spill_bytes=44, smem=1024)
    assert Report("a", registers=128, shared=1000).ok
    assert not Report("b", registers=255, spill_bytes=44).ok
    assert not Report("c", shared=HOPPER_SHARED_LIMIT + 1).ok
    assert not Report("d", error="CompilationError: ...").ok
    with pytest.raises(RuntimeError, match="no register count"):
        parse_ptxas("ptxas fatal   : Unsupported .version 9.4")


def test_masked_ce_forward_strided_offsets_are_64_bit():
    """``rows * stride_h`` and ``cols * stride_w`` of the forward's tiles, compiled for sm_90, are int64
    pointer offsets: an int32 one wraps once a row's start passes 2^31 elements (n * H >= 2^31: 524,288
    selected rows at H = 4096 in a no-grad reference forward). The TTIR shows the broadcast row ([M, 1])
    and column ([1, V]) offsets; the in-tile ``ks`` offsets (< BLOCK_K) may stay int32."""
    if bundled_ptxas() is None:
        pytest.skip("triton's NVIDIA backend is absent: cannot compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tools.aot_report", "--offsets", "--only", "masked_linear_ce.forward"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 8, lines  # 16-bit x2, fp32 TF32 and IEEE, with and without bias
    for line in lines:
        name, *offsets = line.split()
        strided = [o for o in offsets if re.fullmatch(r"(1x\d+|\d+x1):i\d+", o)]
        assert len(strided) == 2, (name, offsets)
        assert all(o.endswith(":i64") for o in strided), (name, strided)
