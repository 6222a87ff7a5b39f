"""Issue 12, same seed, same bytes: two fresh CPU runs of the default command, started together so that
they contend for the cores, write identical model bytes and identical metrics (timings aside)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ..helpers import ROOT, digest

# The sorting demo's command (embedded model, bundled data, default estimator and batch), shortened: gradients
# differed from the first step when they differed at all.
FLAGS = [
    "--task",
    "sort",
    "--max_steps",
    "4",
    "--eval_size",
    "16",
    "--num_samples",
    "0",
    "--report_to",
    "none",
    "--gen_eval_prompts",
    "16",
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
]
TIMINGS = {"train/tokens_per_s"}

pytestmark = pytest.mark.slow


def start(output_dir, threads: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-m", "vrpo.train", *FLAGS, "--output_dir", str(output_dir)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]


def metrics(output_dir) -> list[dict]:
    lines = (pathlib.Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def test_two_contending_fresh_runs_write_the_same_bytes(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [start(run) for run in runs]  # at the same time: they contend for the cores
    for proc in procs:
        finish(proc)
    a, b = runs
    assert metrics(a) == metrics(b)
    for rel in (
        "model/model.safetensors",
        "checkpoints/checkpoint-00000002/model.safetensors",
        "checkpoints/checkpoint-00000002/optimizer.bin",
    ):
        assert digest(a / rel) == digest(b / rel), rel
