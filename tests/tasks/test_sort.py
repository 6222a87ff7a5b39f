"""The toy sorting task: its verifier, its pairing rule, and the shipped SFT model and on-policy pairs."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pathlib
import subprocess
import sys

import pytest
import tomllib

from vrpo.tasks.sort import build, task
from vrpo.tasks.sort.__main__ import main as sort_main

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "vrpo" / "tasks" / "sort" / "data"


def test_grade_exact_and_partial_credit():
    assert task.grade("sort 5 2 8", "2 5 8") == task.Grade(True, 1.0)
    assert task.grade("sort 5 2 8", "2 8 5") == task.Grade(False, 1 / 3)
    assert task.grade("sort 3 3 1", "1 3 3") == task.Grade(True, 1.0)
    # Missing or extra items cost credit: the denominator is the longer list.
    assert task.grade("sort 5 2 8", "2 5") == task.Grade(False, 2 / 3)
    assert task.grade("sort 5 2 8", "2 5 8 9") == task.Grade(False, 3 / 4)
    assert task.grade("sort 5 2 8", "") == task.Grade(False, 0.0)
    assert task.is_correct("sort 9 0 4", "0 4 9") and not task.is_correct("sort 9 0 4", "0 9 4")


def test_rank_pair_puts_a_right_answer_against_the_nearest_miss():
    prompt = "sort 4 1 3"
    pair = build.rank_pair(prompt, ["3 1 4", "1 3 4", "1 4 3", "4 3 1"])
    # "1 4 3" (credit 1/3, later) ties "3 1 4" (credit 1/3): the earlier sample wins the tie.
    assert pair == {"prompt": prompt, "chosen": "1 3 4", "rejected": "3 1 4"}
    assert build.rank_pair(prompt, ["4 3 1", "1 3 4 4", "1 3 4"])["rejected"] == "1 3 4 4"  # credit 3/4
    assert build.rank_pair(prompt, ["1 3 4", "1 3 4"]) is None  # nothing wrong to reject
    assert build.rank_pair(prompt, ["3 1 4", "1 3"]) is None  # nothing right to choose
    # An empty answer (the turn ended at once) cannot be a preference row's side.
    assert build.rank_pair(prompt, ["", "1 3 4", "3 1 4"])["rejected"] == "3 1 4"
    assert build.rank_pair(prompt, ["", "1 3 4"]) is None


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "vrpo.tasks.sort", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_commands_reproduce_their_outputs_bit_for_bit(tmp_path):
    tiny_sft = ["--steps", "3", "--batch_size", "4", "--dev_prompts", "4"]
    tiny_pairs = ["--prompts", "6", "--samples", "3"]
    for run in ("a", "b"):
        _run(["sft", "--output_dir", f"sft-{run}", *tiny_sft], tmp_path)
        _run(["pairs", "--model", f"sft-{run}", "--output", f"pairs-{run}.jsonl", *tiny_pairs], tmp_path)
    assert _files(tmp_path / "sft-a") == _files(tmp_path / "sft-b")
    for name in ("pairs-{}.jsonl", "pairs-{}.meta.json"):
        assert (tmp_path / name.format("a")).read_bytes() == (tmp_path / name.format("b")).read_bytes()
    # User files are not overwritten without --overwrite.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = subprocess.run(
        [sys.executable, "-m", "vrpo.tasks.sort", "sft", "--output_dir", "sft-a", *tiny_sft],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_synthetic_command_reproduces_the_shipped_file_and_keeps_user_files(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert sort_main(["synthetic", str(out)]) == 0
    assert out.read_bytes() == (DATA / task.SYNTHETIC_PAIRS_FILE).read_bytes()
    out.write_text("mine\n")
    assert sort_main(["synthetic", str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert (
        sort_main(["synthetic", str(out), "--overwrite"]) == 0
        and out.read_bytes() == (DATA / task.SYNTHETIC_PAIRS_FILE).read_bytes()
    )


def test_shipped_files_record_the_commands_defaults():
    sft = json.loads((DATA / task.SFT_DIR / task.SFT_SETTINGS_FILE).read_text())
    assert sft["settings"] == dataclasses.asdict(task.SFTSettings())
    assert sft["sampler"] == dataclasses.asdict(task.EVAL_SAMPLER)
    assert sft["model_shape"] == task.MODEL_SHAPE and sft["threads"] == task.THREADS
    assert 0.3 <= sft["dev_accuracy"] <= 0.6, sft["dev_accuracy"]
    meta = json.loads((DATA / "pairs.meta.json").read_text())
    assert meta["settings"] == dataclasses.asdict(task.PairSettings())
    assert meta["model_sha256"] == build.sha256_of(str(DATA / task.SFT_DIR / "model.safetensors"))
    assert build.meta_path(task.pairs_path()) == str(DATA / "pairs.meta.json")


def test_shipped_pairs_are_ranked_by_the_verifier():
    from vrpo.training.data import read_preference_rows

    rows = read_preference_rows(task.pairs_path())
    meta = json.loads((DATA / "pairs.meta.json").read_text())
    assert len(rows) == meta["stats"]["pairs"]
    assert len({r["prompt"] for r in rows}) == len(rows)  # one pair per prompt: a held-out split holds out prompts
    for r in rows:
        chosen, rejected = task.grade(r["prompt"], r["chosen"]), task.grade(r["prompt"], r["rejected"])
        assert chosen.correct and not rejected.correct and r["rejected"], r


def test_shipped_sft_model_is_small_and_sorts_as_recorded():
    from vrpo.models import load_llada

    path = task.sft_path()
    size = sum(p.stat().st_size for p in pathlib.Path(path).iterdir())
    assert size < 4 * 2**20, size
    model = load_llada(path, attn_implementation="sdpa")
    sft = json.loads((DATA / task.SFT_DIR / task.SFT_SETTINGS_FILE).read_text())
    prompts = task.dev_prompts(sft["settings"]["seed"], sft["settings"]["dev_prompts"])
    report = task.evaluate_generations(model, task.task_tokenizer(), prompts)
    # The recorded dev accuracy is this model's (up to an argmax tie flipped by another thread count).
    assert abs(report.accuracy - sft["dev_accuracy"]) <= 0.01, (report.accuracy, sft["dev_accuracy"])
    assert len(report.samples) == len(prompts) and all("credit" in s for s in report.samples)


def test_shipped_sft_folder_is_what_save_llada_writes_today(tmp_path):
    # The SFT command writes the folder with save_llada; a shipped file left from an older save_llada
    # (a config.json with a stale key, say) would not be what the command reproduces.
    from vrpo.models import load_llada, save_llada

    save_llada(load_llada(task.sft_path(), attn_implementation="sdpa"), tmp_path / "m")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).read_bytes() == (DATA / task.SFT_DIR / name).read_bytes(), name
    # ... with the tokenizer the task builds, saved beside it (a checkpoint folder like any other).
    task.task_tokenizer().save_pretrained(tmp_path / "t")
    for name in sorted(p.name for p in (tmp_path / "t").iterdir()):
        assert (tmp_path / "t" / name).read_bytes() == (DATA / task.SFT_DIR / name).read_bytes(), name


def test_package_data_globs_cover_the_shipped_files():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "vrpo.tasks.sort"
    ]
    shipped = [p.relative_to(DATA.parent).as_posix() for p in DATA.rglob("*") if p.is_file()]
    missing = [f for f in shipped if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"pyproject.toml's package-data misses {missing}"


def test_test_prompts_are_fixed_distinct_and_never_trained_on():
    prompts = task.test_prompts()
    assert prompts == task.test_prompts() and len(set(prompts)) == len(prompts) == task.TEST_PROMPTS
    shipped = {json.loads(line)["prompt"] for line in (DATA / task.PAIRS_FILE).read_text().splitlines()}
    assert not shipped & set(prompts)  # neither trained on nor held out for preference accuracy
    assert not set(task.dev_prompts(task.SFTSettings.seed, task.SFTSettings.dev_prompts)) & set(prompts)
    lengths = [len(p.split()) - 1 for p in prompts]
    assert [lengths.count(k) for k in range(3, 7)] == [task.TEST_PROMPTS // 4] * 4  # the task's lengths, uniform
    assert len(set(lengths[:8])) > 1  # shuffled, not grouped by length


def test_graded_samples_are_described():
    right = {"prompt": "sort 5 2 8", "answer": "2 5 8", "correct": True, "credit": 1.0}
    wrong = {"prompt": "sort 5 2 8", "answer": "2 8 5", "correct": False, "credit": 1 / 3}
    assert task.describe_sample(right) == "'sort 5 2 8' -> '2 5 8' [correct]"
    assert task.describe_sample(wrong) == "'sort 5 2 8' -> '2 8 5' [wrong, credit 0.33]"


def test_training_plot_is_written(tmp_path):
    from vrpo.training.plots import plot_training

    records = (
        [{"step": 0, "eval/pref_acc": 0.6}]
        + [
            {"step": s, "loss/vrpo": 0.7 - 0.01 * s, "rewards/accuracies": 0.5 + 0.01 * s, "score/var": 0.1 / s}
            for s in range(1, 11)
        ]
        + [{"step": 10, "eval/pref_acc": 0.8}]
    )
    summary = {"gen_acc_before": 0.4, "gen_acc_after": 0.6, "gen_credit_before": 0.8, "gen_credit_after": 0.9}
    path = plot_training(records, summary, str(tmp_path / "plots" / "training.png"))
    assert path and pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["training.png"]  # no temporary left behind


def test_the_quick_start_draws_its_plot_with_a_plain_install():
    """The quick start (`pip install -e . && python -m vrpo.train`) promises plots/training.png: matplotlib
    must be a plain dependency, not only an extra's (a plain install used to print that it was missing)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "matplotlib" for d in deps), deps


def test_a_missing_matplotlib_is_a_warning_naming_the_fix(tmp_path, monkeypatch, caplog):
    from vrpo.training import plots

    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level("WARNING", logger="vrpo"):
        assert plots.plot_training([], {}, str(tmp_path / "training.png")) is None
    assert "matplotlib is not installed" in caplog.text and "pip install" in caplog.text


def test_the_old_module_names_still_work_with_a_deprecation_warning(tmp_path):
    """vrpo.toy (and its CLI), vrpo.generate and vrpo.tokenization moved in 0.2; their aliases keep the README's
    names working for one release, and say where the code went."""
    import importlib
    import warnings

    for old, new, name in (
        ("vrpo.toy", "vrpo.tasks.sort", "grade"),
        ("vrpo.generate", "vrpo.models", "generate"),
        ("vrpo.tokenization", "vrpo.models", "load_tokenizer"),
    ):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "vrpo.toy", "synthetic", str(tmp_path / "x.jsonl"), "--n", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and (tmp_path / "x.jsonl").read_text().count("\n") == 3, out.stderr[-2000:]


def test_the_old_toy_names_still_work_with_a_deprecation_warning():
    """0.1's ``toy_*`` functions of the sorting task are its plain names now; the old ones answer for one release
    with a warning naming the new one, and vrpo.toy still exports them. Catches an alias dropped or bound to the
    wrong function."""
    import warnings

    from vrpo.tasks.sort import task

    for old, new in (
        ("toy_sft_path", "sft_path"),
        ("toy_pairs_path", "pairs_path"),
        ("toy_dataset_path", "synthetic_pairs_path"),
        ("toy_tokenizer", "task_tokenizer"),
    ):
        with pytest.warns(DeprecationWarning, match=f"{old} is {new};"):
            assert getattr(task, old) is getattr(task, new)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import vrpo.toy

        assert getattr(vrpo.toy, old) is getattr(task, new)
    with pytest.raises(AttributeError, match="no attribute 'toy_nothing'"):
        task.toy_nothing  # noqa: B018
