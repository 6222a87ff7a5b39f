"""FSDP2 through accelerate, on 2 CPU processes (gloo) with the tiny LLaDA: the same losses and final model as one
process, sharded checkpoints that resume, a sharded reference, LoRA with its adapters-off reference; and
``--algorithm grpo`` under FSDP2 (with LoRA, a KL term and a resume) and under DDP.

accelerate only selects FSDP on GPU backends, so the runs go through ``tests/training/fsdp_cpu.py``, which switches
accelerate's state to FSDP with the plugin ``accelerate launch`` built from the example config (see its docstring).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from vrpo.models import load_llada

from ..helpers import on_the_demo

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGS = [
    "--n_t",
    "2",
    "--eval_size",
    "15",
    "--num_samples",
    "1",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--gen_eval_prompts",
    "16",
    "--overwrite_output_dir",
    "--max_steps",
    "6",
    "--save_steps",
    "3",
]

pytestmark = pytest.mark.slow


def cpu_launch_config(tmp_path, example: str) -> pathlib.Path:
    """The example accelerate config for 2 processes, without mixed precision (the CPU runs fp32)."""
    cfg = yaml.safe_load((ROOT / "examples" / example).read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    path = tmp_path / example
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args, launcher=None, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = launcher or [sys.executable, "-m", "vrpo.train"]
    return subprocess.run(cmd + on_the_demo(args), env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def fsdp(tmp_path, args, port):
    launcher = [
        "accelerate",
        "launch",
        "--config_file",
        str(cpu_launch_config(tmp_path, "accelerate_fsdp.yaml")),
        "--main_process_port",
        str(port),
        str(ROOT / "tests" / "training" / "fsdp_cpu.py"),
    ]
    return run(args, launcher, env={"ACCELERATE_USE_CPU": "1"})


def losses(output_dir) -> torch.Tensor:
    records = map(json.loads, (pathlib.Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines())
    return torch.tensor([[r["step"], r["loss/vrpo"]] for r in records if "loss/vrpo" in r], dtype=torch.float64)


def weights(path) -> dict[str, torch.Tensor]:
    return dict(load_llada(path).named_parameters())


def test_fsdp_two_processes_match_one_resume_and_gather_the_model(tmp_path):
    one = run(FLAGS + ["--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    two = fsdp(tmp_path, FLAGS + ["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two")], 29531)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    assert "reference sharded like the policy (FSDP2, 2 processes)" in two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a[:, 0].tolist() == b[:, 0].tolist() == list(range(1, 7))
    print(f"\nFSDP2 (2 CPU processes) vs one process: max |loss difference| {(a - b).abs().max().item():.2e}")
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # The final model is gathered and written in LLaDA's format, equal to the one-process model.
    assert json.loads((tmp_path / "two" / "model" / "config.json").read_text())["model_type"] == "llada"
    w1, w2 = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    samples = [json.loads((tmp_path / d / "summary.json").read_text())["samples"] for d in ("one", "two")]
    assert samples[0] == samples[1] and len(samples[0]) == 1
    # Checkpoints hold the sharded state: one file per process for the model and the optimizer.
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-00000003"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        shards = sorted(p.name for p in (ckpt / part).iterdir() if p.suffix == ".distcp")
        assert shards == ["__0_0.distcp", "__1_0.distcp"], shards
    assert not [p for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    # Resume from step 3's sharded checkpoint: the same losses for steps 4-6 and the same final model.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("checkpoint-00000006", "model"))
    (resumed / "checkpoints" / "latest").write_text("checkpoint-00000003\n")
    again = fsdp(
        tmp_path,
        FLAGS
        + ["--per_device_train_batch_size", "4", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
        29532,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    torch.testing.assert_close(losses(resumed), b, rtol=0, atol=0)
    w3 = weights(resumed / "model")
    for name in w2:
        torch.testing.assert_close(w3[name], w2[name], rtol=0, atol=0, msg=name)


def test_fsdp_lora_reference_with_adapters_off_matches_one_process(tmp_path):
    """LoRA under FSDP2: the reference is the sharded policy with its adapters off; the gathered model merges them."""
    flags = FLAGS + [
        "--num_samples",
        "0",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--use_lora",
        "--learning_rate",
        "1e-2",
    ]
    one = run(flags + ["--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    two = fsdp(tmp_path, flags + ["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two")], 29533)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
    w1, w2 = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)


def grpo_records(output_dir) -> list[dict]:
    rows = map(json.loads, (pathlib.Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows if "loss/grpo" in r]


GRPO_FLAGS = [
    "--algorithm",
    "grpo",
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "1",
    "--gen_eval_prompts",
    "16",
    "--num_generations",
    "4",
    "--num_iterations",
    "2",
    "--n_t",
    "2",
    "--stratified",
    "--eval_size",
    "8",
    "--eval_n_t",
    "2",
    "--num_samples",
    "0",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
    "--learning_rate",
    "1e-2",
    "--warmup_steps",
    "0",
    "--use_lora",
    "--kl_beta",
    "0.04",
    "--overwrite_output_dir",
]


def test_fsdp_grpo_with_lora_and_kl_trains_sharded_and_resumes_bit_for_bit(tmp_path):
    """--algorithm grpo on 2 FSDP2 processes with LoRA and a KL term (the reference: the sharded policy with its
    adapters off): rollouts sampled on both processes (their prompts' lengths differ, so the sampler's forwards
    must make no collective), TRL's metrics, the gathered LoRA-merged model, and a resume from a sharded
    checkpoint at a rollout boundary (a sample before the first forward of the root) that repeats the run's
    losses and final bytes."""
    flags = GRPO_FLAGS
    two = fsdp(tmp_path, flags + ["--output_dir", str(tmp_path / "two")], 29541)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = grpo_records(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for name in ("reward", "reward_std", "frac_reward_zero_std", "clip_ratio", "kl", "completions/mean_length"):
            assert name in r, (name, r)
    assert rows[1]["kl"] > 0  # the adapters moved the policy off the reference after one update
    assert json.loads((tmp_path / "two" / "model" / "config.json").read_text())["model_type"] == "llada"
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-00000002" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("checkpoint-00000004", "model"))
    (resumed / "checkpoints" / "latest").write_text("checkpoint-00000002\n")
    again = fsdp(tmp_path, flags + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], 29542)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert grpo_records(resumed) == rows
    w2, w3 = weights(tmp_path / "two" / "model"), weights(resumed / "model")
    for name in w2:
        torch.testing.assert_close(w3[name], w2[name], rtol=0, atol=0, msg=name)


def test_ddp_grpo_two_processes(tmp_path):
    """--algorithm grpo under DDP (accelerate's MULTI_CPU over gloo): each process samples its own prompts."""
    launcher = [
        "accelerate",
        "launch",
        "--config_file",
        str(cpu_launch_config(tmp_path, "accelerate_ddp.yaml")),
        "--main_process_port",
        "29543",
        "-m",
        "vrpo.train",
    ]
    two = run(GRPO_FLAGS + ["--output_dir", str(tmp_path / "two")], launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    rows = grpo_records(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[1]["kl"] > 0
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()
