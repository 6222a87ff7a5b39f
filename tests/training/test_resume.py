"""Issue 12, the run's life: a user's files are never written over, one run per directory, SIGTERM/SIGINT
stop with a checkpoint that resumes bit for bit, non-finite updates never reach a checkpoint, and a resume
is the same run (or says what differs)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vrpo.tasks.sort import SORT_TASK
from vrpo.train import main
from vrpo.training import VRPOTrainer, loading
from vrpo.training.config import VRPOConfig
from vrpo.training.run_dir import LOCK, MARKER, OutputDirError

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # each builds a run (tokenizes the toy set); two run the CLI in subprocesses
SMALL = dict(
    max_steps=2,
    per_device_train_batch_size=4,
    n_t=1,
    eval_size=8,
    eval_n_t=2,
    num_samples=0,
    gen_eval_prompts=16,
    report_to="none",
    logging_steps=1,
    save_steps=1,
)
FLAGS = [
    "--task",
    "sort",
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--n_t",
    "1",
    "--eval_size",
    "8",
    "--eval_n_t",
    "2",
    "--gen_eval_prompts",
    "16",
    "--num_samples",
    "0",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


def without_throughput(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]


def finite(file) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(file)).values())


def test_a_directory_of_user_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my config")
    (out / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match=f"{out} exists and holds files that are not a vrpo run"):
            VRPOTrainer(VRPOConfig(**SMALL, overwrite_output_dir=overwrite, output_dir=str(out)), task=SORT_TASK)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == "my config"


def test_overwrite_moves_the_old_run_aside_before_writing(tmp_path):
    out = tmp_path / "run"
    old = out / "checkpoints" / "checkpoint-00000009"  # an older run, further along than the new one will get
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text('{"step": 9}')
    (out / "checkpoints" / "latest").write_text("checkpoint-00000009\n")
    (out / MARKER).write_text('{"version": 1}')
    VRPOTrainer(
        VRPOConfig(**SMALL, save_total_limit=1, overwrite_output_dir=True, output_dir=str(out)), task=SORT_TASK
    ).train()
    # The new run's checkpoints were not rotated away in favour of the old run's, and latest is the new run's.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002", "latest"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-00000002"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "checkpoint-00000009" / "trainer_state.json").exists()
    assert oct((out / "model").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_run_on_a_locked_directory_fails_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from vrpo.training.run_dir import RunDir; r = RunDir(sys.argv[1], False, False); "
            "print('held', flush=True); sys.stdin.read()",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError, match=f"in use by another vrpo run \\(pid {holder.pid}\\)"):
            VRPOTrainer(VRPOConfig(**SMALL, output_dir=str(out)), task=SORT_TASK)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    trainer = VRPOTrainer(
        VRPOConfig(**SMALL, output_dir=str(out)), task=SORT_TASK
    )  # free again once the holder is gone
    trainer.close()
    assert (out / LOCK).exists()


def test_an_unusable_output_dir_fails_before_loading(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded before the output directory was checked")

    monkeypatch.setattr(loading, "load_run_tokenizer", never)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="--output_dir .*file is not a directory"):
        VRPOTrainer(VRPOConfig(**SMALL, output_dir=str(tmp_path / "file" / "run")), task=SORT_TASK)


def test_sigint_and_sigterm_checkpoint_and_resume_bit_for_bit(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "VRPO_KILL_AT": "step:1:SIGTERM"}
    term = subprocess.Popen(
        [sys.executable, "-m", "vrpo.train", *FLAGS, "--output_dir", str(tmp_path / "term")],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert main(FLAGS + ["--output_dir", str(tmp_path / "full")]) == 0  # meanwhile, the uninterrupted run
    monkeypatch.setenv("VRPO_KILL_AT", "step:2:SIGINT")
    assert main(FLAGS + ["--output_dir", str(tmp_path / "int")]) == 130
    monkeypatch.delenv("VRPO_KILL_AT")
    _, err = term.communicate(timeout=600)
    assert term.returncode == 143, err[-2000:]
    assert "SIGTERM at step 2/4; checkpoint: " in err and "--resume_from_checkpoint latest" in err, err[-2000:]
    for name, step in (("term", 2), ("int", 3)):  # signalled during step `step`: it finishes, then the checkpoint
        out = tmp_path / name
        assert (out / "checkpoints" / "latest").read_text().strip() == f"checkpoint-{step:08d}"
        assert not (out / "model").exists()
        assert main(FLAGS + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
        assert without_throughput(records(out)) == without_throughput(records(tmp_path / "full"))
        full_model = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
        assert (out / "model" / "model.safetensors").read_bytes() == full_model


def test_a_kill_in_the_final_save_leaves_no_temporaries_or_repeated_eval(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "VRPO_KILL_AT": "model:2"}
    flags = FLAGS + ["--max_steps", "2", "--output_dir", str(out)]
    killed = subprocess.run(
        [sys.executable, "-m", "vrpo.train", *flags], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (out / ".model.tmp-k1ll3d").mkdir(mode=0o700)  # what the kill leaves when it lands inside save_llada
    (out / ".model.tmp-k1ll3d" / "model.safetensors").write_bytes(b"partial")
    assert main(flags + ["--resume_from_checkpoint", "latest"]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model.")]
    final_evals = [r for r in records(out) if r["step"] == 2 and "eval/pref_acc" in r]
    assert len(final_evals) == 1
    assert oct((out / "model").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_non_finite_learning_rate_or_weights_never_reach_a_checkpoint(tmp_path, monkeypatch):
    trainer = VRPOTrainer(
        VRPOConfig(
            **{**SMALL, "max_steps": 6, "save_steps": 2, "save_total_limit": 1}, output_dir=str(tmp_path / "run")
        ),
        task=SORT_TASK,
    )
    real_step, real_opt_step = trainer.train_step, trainer.optimizer.step

    def train_step(step):
        if step == 1:  # step 2: a NaN learning rate (the schedule sets the next one again)
            trainer.optimizer.param_groups[0]["lr"] = float("nan")
        return real_step(step)

    def optimizer_step(*args, **kwargs):
        real_opt_step(*args, **kwargs)
        if trainer.state.step == 3:  # step 4: an update that overflows one weight
            next(p for p in trainer.policy_model.parameters() if p.requires_grad).data.view(-1)[0] = float("inf")

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(trainer.optimizer, "step", optimizer_step)
    summary = trainer.train()
    assert [r["step"] for r in records(tmp_path / "run") if r.get("train/skipped")] == [2, 4]
    assert summary["skipped_steps"] == 2
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-00000006" / "model.safetensors"
    assert finite(ckpt) and finite(tmp_path / "run" / "model" / "model.safetensors")
    assert trainer.weights_finite()


def test_resume_with_other_settings_or_data_is_refused_unless_allowed(tmp_path):
    out = str(tmp_path / "run")
    VRPOTrainer(VRPOConfig(**SMALL, output_dir=out), task=SORT_TASK).train()
    resume = dict(SMALL, output_dir=out, resume_from_checkpoint="latest")
    preset_lr = VRPOConfig(**SMALL).resolved(SORT_TASK.presets).learning_rate  # the toy run's preset
    changed = rf"n_t: 1 -> 3; learning_rate: {re.escape(f'{preset_lr:g}')} -> 0\.01\).*--allow_config_change"
    with pytest.raises(ValueError, match=changed):
        VRPOTrainer(VRPOConfig(**{**resume, "n_t": 3, "learning_rate": 1e-2}), task=SORT_TASK)
    with pytest.raises(ValueError, match="train_data: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        VRPOTrainer(VRPOConfig(**{**resume, "eval_size": 12}), task=SORT_TASK)  # another split: other training pairs
    trainer = VRPOTrainer(VRPOConfig(**{**resume, "learning_rate": 1e-2, "allow_config_change": True}), task=SORT_TASK)
    lam = trainer.scheduler.lr_lambdas[0](trainer.scheduler.last_epoch)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lam)  # honoured, not ignored
    trainer.close()
    same = VRPOTrainer(VRPOConfig(**resume), task=SORT_TASK)
    assert same.optimizer.param_groups[0]["lr"] == pytest.approx(preset_lr * lam)
    same.close()
