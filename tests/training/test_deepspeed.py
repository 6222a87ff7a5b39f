"""The DeepSpeed ZeRO-3 example config is accepted by ``accelerate launch`` with the trainer's arguments, and the
trainer refuses DeepSpeed with a clear error (it does not run under it yet; docs/training.md, Scaling
out)."""

from __future__ import annotations

import pathlib
import types

import pytest

from vrpo.training.config import parse_config
from vrpo.training.distributed import check_supported

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The example's model path is a placeholder; a local checkpoint directory stands in (paths must exist).
TRAIN_ARGS = [
    "--config",
    str(ROOT / "examples" / "llada_8b_vrpo.yaml"),
    "--max_steps",
    "2",
    "--model_name_or_path",
    str(ROOT / "tests" / "fixtures" / "llada-tiny"),
]


def test_zero3_example_is_accepted_by_accelerate_launch(monkeypatch):
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = ROOT / "examples" / "accelerate_deepspeed_zero3.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "vrpo.train", *TRAIN_ARGS])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed and args.num_processes == 8 and args.mixed_precision == "bf16"
    # What `accelerate launch` does next (accelerate.commands.launch.launch_command): the launcher's environment.
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)  # one machine: torch's launcher runs args.training_script
    assert args.module and args.training_script == "vrpo.train" and args.training_script_args == TRAIN_ARGS
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # what each process's Accelerator builds from that environment
    assert plugin.zero_stage == 3 and plugin.gradient_clipping == 1.0 and plugin.zero3_save_16bit_model
    assert plugin.offload_param_device == plugin.offload_optimizer_device == "none"
    cfg = parse_config(args.training_script_args)  # and the trainer accepts its arguments
    assert cfg.gradient_accumulation_steps == 8 and cfg.max_grad_norm == plugin.gradient_clipping


def test_trainer_refuses_deepspeed_with_a_clear_error():
    from accelerate.utils import DistributedType

    with pytest.raises(ValueError, match="DeepSpeed is not supported.*accelerate_fsdp.yaml"):
        check_supported(types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    check_supported(types.SimpleNamespace(distributed_type=DistributedType.FSDP))
