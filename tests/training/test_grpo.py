"""``--algorithm grpo`` end to end on the sorting demo: it trains, logs TRL's GRPO metrics, and a run stopped by
a signal resumes to the same bytes; the algorithm setting and its alias."""

from __future__ import annotations

import json
import pathlib

import pytest

from vrpo.tasks.sort import task as sort_task
from vrpo.train import main
from vrpo.training.config import VRPOConfig, parse_config

# 2 prompts x 4 completions a step, 2 levels per ELBO, two optimizer steps per rollout batch (the stored
# rollout-policy terms), a checkpoint at every rollout batch.
FLAGS = ["--algorithm", "grpo", "--max_steps", "4", "--per_device_train_batch_size", "2", "--num_generations", "4", "--gen_eval_prompts", "16",
         "--num_iterations", "2", "--n_t", "2", "--stratified", "--eval_size", "8", "--eval_n_t", "2",
         "--num_samples", "0", "--report_to", "none", "--logging_steps", "1", "--save_steps", "2",
         "--learning_rate", "1e-3", "--warmup_steps", "0"]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


def without_throughput(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]


def test_grpo_trains_logs_its_metrics_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    real = sort_task.test_prompts
    monkeypatch.setattr(sort_task, "test_prompts", lambda n=64: real(64))  # graded before and after: keep it short
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main(FLAGS + ["--output_dir", str(full)]) == 0
    steps = [r for r in records(full) if "loss/grpo" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for name in ("reward", "reward_std", "frac_reward_zero_std", "clip_ratio", "completions/mean_length",
                     "score/var", "elbo/var"):
            assert name in r, (name, r)
    # Steps 2 and 4 reuse their batch's rollouts with the weights one update on: the ratio moved off 1.
    assert steps[0]["score/var"] == 0 and steps[1]["score/var"] > 0
    assert steps[0]["reward"] == steps[1]["reward"]  # the same rollouts
    summary = json.loads((full / "summary.json").read_text())
    assert summary["algorithm"] == "grpo" and summary["gen_acc_before"] is not None

    monkeypatch.setenv("VRPO_KILL_AT", "step:1:SIGINT")  # during step 2: it finishes, then the checkpoint
    assert main(FLAGS + ["--output_dir", str(stopped)]) == 130
    monkeypatch.delenv("VRPO_KILL_AT")
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "checkpoint-00000002"
    assert main(FLAGS + ["--output_dir", str(stopped), "--resume_from_checkpoint", "latest"]) == 0
    assert without_throughput(records(stopped)) == without_throughput(records(full))
    model = "model/model.safetensors"
    assert (stopped / model).read_bytes() == (full / model).read_bytes()


def test_algorithm_setting_and_the_naive_dpo_alias():
    alias = VRPOConfig(naive_dpo=True).resolved()
    named = VRPOConfig(algorithm="naive_dpo").resolved()
    for cfg in (alias, named):
        assert (cfg.algorithm, cfg.naive_dpo, cfg.n_t, cfg.n_yt, cfg.antithetic) == ("naive_dpo", True, 1, 1, False)
    assert VRPOConfig().resolved().algorithm == "vrpo"
    with pytest.raises(SystemExit):
        parse_config(["--algorithm", "ppo"])
    with pytest.raises(ValueError, match="--naive_dpo is --algorithm naive_dpo"):
        VRPOConfig(naive_dpo=True, algorithm="grpo")
    with pytest.raises(ValueError, match="--likelihood one_step is GRPO's"):
        VRPOConfig(likelihood="one_step")
    with pytest.raises(ValueError, match="--likelihood must be one of"):
        VRPOConfig(algorithm="grpo", likelihood="exact")
    with pytest.raises(ValueError, match="--precompute_ref does not combine with --algorithm grpo"):
        VRPOConfig(algorithm="grpo", precompute_ref=True)
    with pytest.raises(ValueError, match="--epsilon must be in"):
        VRPOConfig(algorithm="grpo", epsilon=1.0)
    with pytest.raises(ValueError, match="--reward_fn must be 'module:function'"):
        VRPOConfig(algorithm="grpo", reward_fn="rewards.py")
    with pytest.raises(ValueError, match="--num_generations must be an integer >= 2"):
        VRPOConfig(algorithm="grpo", num_generations=1)


def test_d1s_one_step_likelihood_trains_with_a_kl_term(tmp_path, monkeypatch):
    """``--likelihood one_step`` (the ablation's d1 estimate): one sample per completion, so no score/var; the
    second step of a rollout batch moves the ratio off 1 and the KL term off 0 (catches a draw that ignores the
    stored rollout terms or the reference)."""
    real = sort_task.test_prompts
    monkeypatch.setattr(sort_task, "test_prompts", lambda n=16: real(16))
    out = tmp_path / "one_step"
    assert main(FLAGS[:-4] + ["--likelihood", "one_step", "--kl_beta", "0.1", "--max_steps", "2", "--save_steps", "0",
                              "--learning_rate", "1e-3", "--warmup_steps", "0", "--output_dir", str(out)]) == 0
    steps = [r for r in records(out) if "loss/grpo" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert "score/var" not in steps[0] or steps[0]["score/var"] != steps[0]["score/var"]  # nan: one sample
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0
    assert steps[0]["score/mean"] == 0 and steps[1]["score/mean"] != 0
