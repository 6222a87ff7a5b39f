"""``python -m vrpo.eval`` data parallel (lm-eval's rank/world-size split) on two CPU processes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from lm_eval.api.instance import Instance

from vrpo.eval import VRPOEvalLM
from vrpo.tasks.sort.task import sft_path

ARGS = [
    "-m",
    "vrpo.eval",
    "--model_name_or_path",
    sft_path(),
    "--tasks",
    "vrpo_sort_mc",
    "--apply_chat_template",
    "--limit",
    "8",
    "--model_args",
    "mc_num=8",
    "--log_samples",
]


@pytest.mark.slow
def test_two_processes_split_the_documents_and_match_one(tmp_path):
    # accelerate reads torchrun's environment; on CPU it needs ACCELERATE_USE_CPU to start a gloo group.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            *ARGS,
            "--output_path",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "processes: 2, likelihood forward sequences: 256" in two.stdout  # 8 docs x 4 choices x 8, split
    path = glob.glob(os.path.join(tmp_path, "*", "samples_vrpo_sort_mc_*.jsonl"))[0]
    rows = sorted(map(json.loads, open(path)), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(8))  # each document once, from either process
    # One process scoring the same requests gets the same estimates: draws are keyed by the request, not the
    # process. Not bit for bit: the packed rows differ, so float32 sums in the model run in another order
    # (unit roundoff 6e-8 times reductions of up to 192 terms: ~1e-5 relative).
    lm = VRPOEvalLM(sft_path(), mc_num=8)
    reqs = [
        Instance("loglikelihood", {}, (a["arg_0"], a["arg_1"]), i)
        for r in rows
        for i, a in enumerate(r["arguments"].values())
    ]
    single = [ll for ll, _ in lm.loglikelihood(reqs)]
    logged = [s["elbo"] for r in rows for s in r["vrpo"]]
    assert logged == pytest.approx(single, rel=1e-5, abs=1e-5)
