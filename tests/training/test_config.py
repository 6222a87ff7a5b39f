"""Issue 12, numbers that are not numbers and model paths: every bad flag is an argparse-style error
naming the flag, before anything loads (``--beta nan`` used to run, skip every step and exit 0)."""

import pathlib
import time

import pytest

from vrpo.training.config import parse_config


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "nan"], "--beta must be > 0 and finite, got nan"),
        (["--beta", "inf"], "--beta must be > 0 and finite, got inf"),
        (["--learning_rate", "nan"], "--learning_rate must be > 0 and finite, got nan"),
        (["--learning_rate", "0"], "--learning_rate must be > 0 and finite, got 0.0"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be >= 0 and finite, got nan"),
        (["--sft_weight", "inf"], "--sft_weight must be >= 0 and finite, got inf"),
        (["--label_smoothing", "nan"], "--label_smoothing must be in [0, 0.5), got nan"),
        (["--weight_decay=-0.1"], "--weight_decay must be >= 0 and finite, got -0.1"),
        (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1.0"),
        (["--adam_epsilon", "0"], "--adam_epsilon must be > 0 and finite, got 0.0"),
        (["--t_floor", "nan"], "--t_floor must be in [0, 1), got nan"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
        (["--max_steps", "0"], "--max_steps must be -1 (one pass per epoch) or a positive integer, got 0"),
        (["--max_steps=-5"], "--max_steps must be -1"),
        (["--warmup_steps=-1"], "--warmup_steps must be an integer >= 0, got -1"),
        (["--save_total_limit", "0"], "--save_total_limit must be a positive integer, got 0"),
        (["--save_steps=-1"], "--save_steps must be an integer >= 0, got -1"),
        (["--logging_steps", "0"], "--logging_steps must be a positive integer, got 0"),
        (["--eval_size=-3"], "--eval_size must be an integer >= 0, got -3"),
        (["--gen_length", "0"], "--gen_length must be a positive integer, got 0"),
        (["--ce_max_buffer_mb", "0"], "--ce_max_buffer_mb must be a positive integer, got 0"),
        (["--seed=-1"], "--seed must be an integer >= 0, got -1"),
        (["--lr_scheduler_type", "cosin"], "--lr_scheduler_type must be one of linear, cosine"),
    ],
)
def test_out_of_range_flags_are_refused_by_name(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " + message in err, err


def test_yaml_config_values_go_through_the_same_checks(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("beta: .nan\nmax_steps: 10\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert "--beta must be > 0 and finite, got nan" in capsys.readouterr().err


def test_a_missing_model_path_fails_at_once_without_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for flag in ("--model_name_or_path", "--ref_model_name_or_path", "--tokenizer_name_or_path"):
        t0 = time.perf_counter()
        with pytest.raises(SystemExit):
            parse_config([flag, str(tmp_path / "no_such_model")])
        assert time.perf_counter() - t0 < 5  # a refusal, not connection attempts
        assert f"{flag} {tmp_path / 'no_such_model'}: no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--model_name_or_path", "GSAI-ML/LLaDA-8B-Instruct"])
    err = capsys.readouterr().err
    assert "GSAI-ML/LLaDA-8B-Instruct: no such local directory" in err
    assert "hf download GSAI-ML/LLaDA-8B-Instruct --local-dir LLaDA-8B-Instruct" in err
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_config(["--model_name_or_path", str(tmp_path / "weights.bin")])
    assert "weights.bin: not a directory" in capsys.readouterr().err


def test_good_flags_still_parse(tmp_path):
    cfg = parse_config(
        [
            "--beta",
            "0.1",
            "--max_steps",
            "-1",
            "--save_steps",
            "0",
            "--warmup_steps",
            "0",
            "--model_name_or_path",
            str(tmp_path),
        ]
    )
    assert cfg.beta == 0.1 and cfg.max_steps == -1


def test_a_model_config_too_big_for_memory_is_refused_before_building(tmp_path):
    import json
    import shutil

    from vrpo.errors import CheckpointError
    from vrpo.models import load_llada

    fixture = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "llada-tiny"
    shutil.copytree(fixture, tmp_path / "huge")
    config = json.loads((tmp_path / "huge" / "config.json").read_text())
    config["n_layers"] = 1_000_000
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    with pytest.raises(
        CheckpointError, match=r"huge/config\.json: the config describes [\d,]+ parameters .* more than"
    ):
        load_llada(tmp_path / "huge", dtype="float32")
    assert time.perf_counter() - t0 < 5  # refused from the count, not after building a million layers


def test_the_parameter_count_is_exact():
    import json

    from vrpo.models import load_llada
    from vrpo.models.io import check_fits
    from vrpo.models.llada import llada_to_llama_config

    fixtures = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
    model = load_llada(fixtures / "llada-tiny")
    counted = check_fits(model.config, None, "cpu", "tiny")
    assert counted == sum(p.numel() for p in model.parameters())
    meta = fixtures / "llada-8b-instruct-meta" / "config.json"
    big = llada_to_llama_config(json.loads(meta.read_text()), source=str(meta))
    assert 8.0e9 < check_fits(big, None, "cpu", meta) < 8.1e9  # LLaDA-8B: 8.02B parameters


BAD = pathlib.Path(__file__).resolve().parents[1] / "data" / "bad"  # the bad-input corpus


@pytest.mark.parametrize(
    "name, message",
    [
        ("config_bad_n_t.yaml", "--n_t must be a positive integer, got 0"),
        ("config_bad_beta.yaml", "--beta must be > 0 and finite, got -0.1"),
        ("config_bad_loss_type.yaml", "--loss_type must be one of sigmoid, ipo, hinge, robust, got 'kto'"),
        ("config_bad_estimator.yaml", "--estimator must be one of l_uniform, t_bernoulli, got 'uniform'"),
        ("config_not_yaml.yaml", "not valid YAML"),
        ("config_unknown_field.yaml", "unknown field"),
    ],
)
def test_bad_configs_are_clear_errors(name, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(BAD / name)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n_t", "-1"], "--n_t must be a positive integer"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--loss_type", "nope"], "--loss_type must be one of"),
        (["--estimator", "x"], "--estimator must be one of"),
    ],
)
def test_bad_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(flags)
    assert message in capsys.readouterr().err
