"""Issue 12, resuming from a checkpoint someone else made: nothing in it runs, and every corrupt file is
an error that names it (accelerate unpickled ``custom_checkpoint_0.pkl`` with ``weights_only=False``)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vrpo.errors import CheckpointError, RunLogError
from vrpo.tasks.sort import SORT_TASK
from vrpo.tasks.sort.task import synthetic_pairs_path
from vrpo.training import VRPOTrainer
from vrpo.training.checkpoints import CheckpointManager
from vrpo.training.config import VRPOConfig

MARKER = "payload-ran"


class Payload:
    """Unpickling this creates a file: proof that a checkpoint ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def config(run_dir, data, **kw) -> VRPOConfig:
    return VRPOConfig(
        dataset=str(data),
        max_steps=2,
        per_device_train_batch_size=4,
        n_t=2,
        eval_size=8,
        num_samples=0,
        report_to="none",
        logging_steps=1,
        save_steps=1,
        output_dir=str(run_dir),
        **kw,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished two-step run with a checkpoint at each step, and its small dataset."""
    root = tmp_path_factory.mktemp("made")
    data = root / "pairs.jsonl"
    data.write_text("".join(open(synthetic_pairs_path(), encoding="utf-8").readlines()[:48]))
    VRPOTrainer(config(root / "run", data), task=SORT_TASK).train()
    return root / "run", data


@pytest.fixture
def run(made, tmp_path):
    """A fresh copy of the made run, to damage."""
    src, data = made
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run", data


def checkpoint_of(run_dir) -> pathlib.Path:
    root = pathlib.Path(run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def resume(run_dir, data):
    return VRPOTrainer(config(run_dir, data, resume_from_checkpoint="latest"), task=SORT_TASK).train()


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.bin",
        "random_states_0.pkl",
        "eval_reference.pt",
        "custom_checkpoint_0.pkl",
        "custom_state_0.json",
        "trainer_state.json",
        "extra.bin",
    ],
)
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_planted_pickle_payload_never_runs_and_the_error_names_the_file(run, tmp_path, monkeypatch, name, writer):
    run_dir, data = run
    monkeypatch.chdir(tmp_path)
    target = checkpoint_of(run_dir) / name
    payload = {"state": Payload(str(tmp_path / MARKER)), "step": 2}
    if writer == "torch.save":
        torch.save(payload, target)
    else:
        with open(target, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=str(target)):
        resume(run_dir, data)
    assert not (tmp_path / MARKER).exists(), f"unpickling {name} ran the payload"


def test_every_non_safetensors_file_is_covered(made):
    """The files the test above plants into are all the pickle-capable files a checkpoint has."""
    files = {p.name for p in checkpoint_of(made[0]).iterdir()}
    assert files == {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "eval_reference.pt",
        "custom_state_0.json",
        "trainer_state.json",
    }, files


def test_a_clean_checkpoint_resumes(run):
    run_dir, data = run
    summary = resume(run_dir, data)
    assert summary["steps"] == 2


def test_latest_cannot_point_outside_the_run(run, tmp_path):
    run_dir, data = run
    other = tmp_path / "other_run" / "checkpoints" / "checkpoint-00000009"
    shutil.copytree(checkpoint_of(run_dir), other)
    latest = run_dir / "checkpoints" / "latest"
    for name in ("../../other_run/checkpoints/checkpoint-00000009", str(other), "checkpoint-00000002/../../.."):
        latest.write_text(name + "\n")
        with pytest.raises(CheckpointError, match="not a checkpoint-N directory inside"):
            resume(run_dir, data)
    # a symlinked checkpoint directory that leads out of the run is refused the same way
    (run_dir / "checkpoints" / "checkpoint-00000009").symlink_to(other)
    latest.write_text("checkpoint-00000009\n")
    with pytest.raises(CheckpointError, match="not a checkpoint-N directory inside"):
        resume(run_dir, data)
    # nor is it the newest complete checkpoint when there is no pointer
    latest.unlink()
    assert CheckpointManager(str(run_dir), accelerator=None).latest() == str(
        run_dir / "checkpoints" / "checkpoint-00000002"
    )


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wrong_shape(path):
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", truncate, "not a readable safetensors file"),
        ("model.safetensors", wrong_shape, r"has shape \(3, 5\), but this run's model has"),
        ("optimizer.bin", truncate, "not a readable torch file"),
        ("random_states_0.pkl", truncate, "not a readable torch file"),
        ("eval_reference.pt", truncate, "not a readable torch file"),
        ("custom_state_0.json", truncate, "not valid JSON"),
        ("custom_state_0.json", lambda p: p.write_text("{}"), "not the state of a LambdaLR"),
        ("trainer_state.json", lambda p: p.write_text("{}"), "non-negative integer 'step'"),
        ("trainer_state.json", lambda p: p.write_text('{"step": 2'), "not valid JSON"),
        ("trainer_state.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    ],
)
def test_a_corrupt_checkpoint_file_is_an_error_naming_it(run, name, damage, message):
    run_dir, data = run
    target = checkpoint_of(run_dir) / name
    damage(target)
    with pytest.raises(CheckpointError, match=f"{target}.*{message}"):
        resume(run_dir, data)


def test_a_binary_latest_is_an_error_naming_it(run):
    run_dir, data = run
    latest = run_dir / "checkpoints" / "latest"
    latest.write_bytes(b"\x80\x04\x95\xff\x00binary")
    with pytest.raises(CheckpointError, match=f"{latest}: not a checkpoint name"):
        resume(run_dir, data)


def test_custom_state_is_json_not_a_pickle(made):
    state = json.loads((checkpoint_of(made[0]) / "custom_state_0.json").read_text())
    assert state["last_epoch"] == 2


def test_manager_resolve_rejects_outside_latest_without_accelerate(tmp_path):
    mgr = CheckpointManager(str(tmp_path), accelerator=None)
    os.makedirs(mgr.root)
    (tmp_path / "x" / "trainer_state.json").parent.mkdir()
    (tmp_path / "x" / "trainer_state.json").write_text('{"step": 1}')
    pathlib.Path(mgr.latest_file).write_text("../x\n")
    with pytest.raises(CheckpointError, match="inside"):
        mgr.resolve("latest")


def sharded_checkpoint(root, extra) -> pathlib.Path:
    """A checkpoint directory with a torch.distributed.checkpoint folder, as FSDP's sharded state writes."""
    import torch.distributed.checkpoint as dcp

    root.mkdir()
    (root / "trainer_state.json").write_text('{"step": 1}')
    dcp.save(
        {"w": torch.arange(6.0), "param_groups": [{"lr": 0.1}], **extra},
        checkpoint_id=str(root / "optimizer_0"),
        no_dist=True,
    )
    return root / "optimizer_0"


def test_a_sharded_checkpoint_is_verified_without_unpickling_it(tmp_path, monkeypatch):
    from vrpo.training.checkpoints import verify_checkpoint

    monkeypatch.chdir(tmp_path)
    clean = sharded_checkpoint(tmp_path / "clean", {})
    assert verify_checkpoint(str(clean.parent))["step"] == 1
    # A payload among the non-tensor items (torch would load it with weights_only=False).
    bad = sharded_checkpoint(tmp_path / "item", {"x": Payload(str(tmp_path / MARKER))})
    with pytest.raises(CheckpointError, match=r"optimizer_0/__0_0\.distcp \(item 'x'\): refusing to unpickle"):
        verify_checkpoint(str(bad.parent))
    # A payload as the shard index (torch reads it with pickle.load).
    with open(clean / ".metadata", "wb") as f:
        pickle.dump(Payload(str(tmp_path / MARKER)), f)
    with pytest.raises(CheckpointError, match=r"optimizer_0/\.metadata: refusing to unpickle"):
        verify_checkpoint(str(clean.parent))
    assert not (tmp_path / MARKER).exists()
    cut = sharded_checkpoint(tmp_path / "cut", {})
    truncate(cut / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated"):
        verify_checkpoint(str(cut.parent))


def test_a_torn_last_metrics_line_is_dropped_on_resume(run):
    run_dir, data = run
    log = run_dir / "logs" / "metrics.jsonl"
    before = log.read_text()
    log.write_text(before + '{"step": 3, "loss/vr')  # killed mid-write
    resume(run_dir, data)
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON again
    assert max(r["step"] for r in records) == 2
    log.write_text('{"step": 1}\nnot json\n' + before)
    with pytest.raises(RunLogError, match=rf"{log}:2: not a JSON record"):
        resume(run_dir, data)


def test_non_finite_evaluation_is_a_clear_stop_not_a_traceback(made, tmp_path):
    from vrpo.errors import TrainingDiverged

    _, data = made
    trainer = VRPOTrainer(config(tmp_path / "nan", data), task=SORT_TASK)
    with torch.no_grad():
        trainer.policy_model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="held-out evaluation at step 0: .*last checkpoint: none"):
        trainer.train()
