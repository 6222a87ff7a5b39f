"""``--algorithm grpo`` end to end on the sorting demo: it trains, logs TRL's GRPO metrics, and a run stopped by
a signal resumes to the same bytes; the algorithm setting and its alias."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from vrpo.tasks.sort import task as sort_task
from vrpo.train import main
from vrpo.training import GRPOTrainer, VRPOTrainer
from vrpo.training.config import GRPOConfig, VRPOConfig, parse_config
from vrpo.training.registry import TRAINERS

# 2 prompts x 4 completions a step, 2 levels per ELBO, two optimizer steps per rollout batch (the stored
# rollout-policy terms), a checkpoint at every rollout batch.
FLAGS = [
    "--task",
    "sort",
    "--algorithm",
    "grpo",
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "2",
    "--num_generations",
    "4",
    "--gen_eval_prompts",
    "16",
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
    "1e-3",
    "--warmup_steps",
    "0",
]


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
        for name in (
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "clip_ratio",
            "completions/mean_length",
            "score/var",
            "elbo/var",
        ):
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


def test_algorithm_setting_and_the_naive_dpo_alias(capsys):
    alias = parse_config(["--naive_dpo"]).resolved()
    named = VRPOConfig(algorithm="naive_dpo").resolved()
    for cfg in (alias, named):
        assert (cfg.algorithm, cfg.n_t, cfg.n_yt, cfg.antithetic) == ("naive_dpo", 1, 1, False)
    assert "naive_dpo" not in {f.name for f in dataclasses.fields(VRPOConfig)}  # stored once: the algorithm
    assert parse_config(["--naive_dpo", "false"]).algorithm == "vrpo"
    assert VRPOConfig().resolved().algorithm == "vrpo"
    assert type(parse_config(["--algorithm", "grpo"])) is GRPOConfig
    for flags, message in [
        (["--algorithm", "ppo"], "--algorithm must be one of vrpo, naive_dpo, grpo, got 'ppo'"),
        (["--naive_dpo", "--algorithm", "grpo"], "--naive_dpo is --algorithm naive_dpo"),
        (
            ["--likelihood", "one_step"],
            "--likelihood does not apply to --algorithm vrpo (a setting of --algorithm grpo)",
        ),
        (
            ["--algorithm", "grpo", "--precompute_ref"],
            "--precompute_ref does not apply to --algorithm grpo (a setting of --algorithm vrpo or naive_dpo)",
        ),
    ]:
        with pytest.raises(SystemExit):
            parse_config(flags)
        assert message in capsys.readouterr().err, flags
    with pytest.raises(ValueError, match="--algorithm grpo has its own settings: use GRPOConfig"):
        VRPOConfig(algorithm="grpo")
    with pytest.raises(ValueError, match="--likelihood must be one of"):
        GRPOConfig(likelihood="exact")
    with pytest.raises(ValueError, match="--epsilon must be in"):
        GRPOConfig(epsilon=1.0)
    with pytest.raises(ValueError, match="--reward_fn must be 'module:function'"):
        GRPOConfig(reward_fn="rewards.py")
    with pytest.raises(ValueError, match="--num_generations must be an integer >= 2"):
        GRPOConfig(num_generations=1)


def test_each_trainer_takes_its_own_config_and_the_registry_picks_it():
    """Catches a registry that maps a config to the wrong trainer (the trainer refuses it before loading)."""
    with pytest.raises(TypeError, match="GRPOTrainer takes a GRPOConfig, got VRPOConfig"):
        GRPOTrainer(VRPOConfig())
    with pytest.raises(TypeError, match="VRPOTrainer takes a VRPOConfig, got GRPOConfig"):
        VRPOTrainer(GRPOConfig())
    assert [next(t for t in TRAINERS if isinstance(c, t.CONFIG)) for c in (VRPOConfig(), GRPOConfig())] == [
        VRPOTrainer,
        GRPOTrainer,
    ]


def test_d1s_one_step_likelihood_trains_with_a_kl_term(tmp_path, monkeypatch):
    """``--likelihood one_step`` (the ablation's d1 estimate): one sample per completion, so no score/var; the
    second step of a rollout batch moves the ratio off 1 and the KL term off 0 (catches a draw that ignores the
    stored rollout terms or the reference)."""
    real = sort_task.test_prompts
    monkeypatch.setattr(sort_task, "test_prompts", lambda n=16: real(16))
    out = tmp_path / "one_step"
    assert (
        main(
            FLAGS[:-4]
            + [
                "--likelihood",
                "one_step",
                "--kl_beta",
                "0.1",
                "--max_steps",
                "2",
                "--save_steps",
                "0",
                "--learning_rate",
                "1e-3",
                "--warmup_steps",
                "0",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    steps = [r for r in records(out) if "loss/grpo" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert "score/var" not in steps[0] or steps[0]["score/var"] != steps[0]["score/var"]  # nan: one sample
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0
    assert steps[0]["score/mean"] == 0 and steps[1]["score/mean"] != 0
