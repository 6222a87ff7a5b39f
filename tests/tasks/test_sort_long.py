"""Sorting long lists (vrpo.tasks.sort_long): the shared verifier and prompts at its lengths, the pairing rule
without gold answers, its builders' determinism, the shipped model and pairs, and ``--task``."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib

import pytest
import tomllib
import torch

from vrpo.tasks import TASKS, get_task
from vrpo.tasks.sort import build
from vrpo.tasks.sort import task as sort
from vrpo.tasks.sort_long import SORT_LONG_TASK
from vrpo.tasks.sort_long import task as long
from vrpo.tasks.sort_long.__main__ import main as long_main
from vrpo.training import GradedTask

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "vrpo" / "tasks" / "sort_long" / "data"


@pytest.fixture
def torch_state():
    """The builders fix torch's thread count and deterministic algorithms for the process: put them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_prompts_have_the_tasks_lengths_and_the_grader_round_trips():
    tokenizer = sort.task_tokenizer()
    prompts = long.dev_prompts(0, 300)
    ks = [len(p.split()) - 1 for p in prompts]
    assert min(ks) == 8 and max(ks) == 16  # both ends drawn, nothing outside
    for prompt in prompts:
        digits = prompt.split()[1:]
        assert sort.prompt_of(list(map(int, digits))) == prompt
        right = long.grade(prompt, sort.reference_answer(prompt))
        assert right == sort.Grade(True, 1.0) and sorted(digits) == sort.reference_answer(prompt).split()
        # The answer's length is what the task is for: 17 to 33 response tokens (digits, spaces, eot, EOS).
        assert sort.answer_tokens(tokenizer, prompt) == 2 * len(digits) + 1
    # Partial credit at these lengths: positions right over the longer list.
    prompt = "sort 9 8 7 6 5 4 3 2 1 0"
    assert long.grade(prompt, "0 1 2 3 4 5 6 7 9 8") == sort.Grade(False, 0.8)
    assert long.grade(prompt, "0 1 2 3 4 5 6 7 8") == sort.Grade(False, 0.9)  # one missing
    assert long.grade(prompt, "9 8 7 6 5 4 3 2 1 0") == sort.Grade(False, 0.0)


def test_rank_pair_without_gold_answers_puts_the_best_against_the_worst():
    prompt = "sort 9 8 7 6 5 4 3 2 1 0"
    answers = [
        "0 1 2 3 5 4 6 7 9 8",  # 0.6
        "1 0 2 3 4 5 6 7 8 9",  # 0.8, the best
        "0 1 2 4 3 5 6 8 7 9",  # 0.6
        "",
        "9 8 7 6 5 4 3 2 1 0",
    ]  # empty (left out) and 0.0, the worst
    pair = build.rank_pair(prompt, answers, "best_vs_worst")
    assert pair == {"prompt": prompt, "chosen": answers[1], "rejected": answers[4]}
    # Ties for the worst go to the earlier sample; the demo's rule wants an exact sort (nearest miss).
    assert build.rank_pair(prompt, answers[:3], "best_vs_worst")["rejected"] == answers[0]
    assert build.rank_pair(prompt, answers) is None
    assert build.rank_pair(prompt, [answers[0], answers[2]], "best_vs_worst") is None  # no credit differs
    right = sort.reference_answer(prompt)
    assert build.rank_pair(prompt, [*answers, right], "best_vs_worst")["chosen"] == right
    assert build.rank_pair(prompt, [*answers, right])["rejected"] == answers[1]  # the demo's: nearest miss
    with pytest.raises(ValueError, match="pairing must be one of right_vs_nearest, best_vs_worst"):
        build.rank_pair(prompt, answers, "best")


def test_margin_stats_summarise_the_credit_differences():
    prompt = "sort 9 8 7 6 5 4 3 2 1 0"
    pairs = [
        {"prompt": prompt, "chosen": "1 0 2 3 4 5 6 7 8 9", "rejected": r}  # chosen: 0.8
        for r in ("0 1 2 3 5 4 6 7 9 8", "0 1 3 2 5 4 6 7 9 8", "9 8 7 6 5 4 3 2 1 0")
    ]  # 0.6, 0.4, 0.0
    stats = build.margin_stats(pairs)
    assert stats["mean"] == pytest.approx((0.2 + 0.4 + 0.8) / 3)
    assert stats["p0"] == pytest.approx(0.2) and stats["max"] == pytest.approx(0.8)
    assert stats["histogram"] == {f"{i / 10:.1f}": int(i in (2, 4, 8)) for i in range(10)}
    assert build.margin_stats([]) == {}


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_commands_reproduce_their_outputs_bit_for_bit(tmp_path, torch_state, capsys):
    tiny_sft = ["--steps", "2", "--batch_size", "4", "--dev_prompts", "2"]
    tiny_pairs = ["--prompts", "4", "--samples", "3"]
    for run in ("a", "b"):
        assert long_main(["sft", "--output_dir", str(tmp_path / f"sft-{run}"), *tiny_sft]) == 0
        assert (
            long_main(
                [
                    "pairs",
                    "--model",
                    str(tmp_path / f"sft-{run}"),
                    "--output",
                    str(tmp_path / f"pairs-{run}.jsonl"),
                    *tiny_pairs,
                ]
            )
            == 0
        )
    assert _files(tmp_path / "sft-a") == _files(tmp_path / "sft-b")
    for name in ("pairs-{}.jsonl", "pairs-{}.meta.json"):
        assert (tmp_path / name.format("a")).read_bytes() == (tmp_path / name.format("b")).read_bytes()
    settings = json.loads((tmp_path / "sft-a" / sort.SFT_SETTINGS_FILE).read_text())["settings"]
    tiny = {"steps": 2, "batch_size": 4, "dev_prompts": 2}
    assert settings == {**dataclasses.asdict(long.SFTSettings()), **tiny}
    meta = json.loads((tmp_path / "pairs-a.meta.json").read_text())
    assert meta["stats"]["prompts"] == 4 and "chosen_not_exact" in meta["stats"]
    assert meta["pairing"] == long.PAIRING == "best_vs_worst"
    # User files are not overwritten without --overwrite.
    capsys.readouterr()
    assert long_main(["sft", "--output_dir", str(tmp_path / "sft-a"), *tiny_sft]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_shipped_files_record_the_commands_defaults():
    sft = json.loads((DATA / long.SFT_DIR / sort.SFT_SETTINGS_FILE).read_text())
    assert sft["settings"] == dataclasses.asdict(long.SFTSettings())
    assert sft["model_shape"] == sort.MODEL_SHAPE and sft["threads"] == sort.THREADS
    # Moderate partial credit, rarely exactly right (what the step count was picked for).
    assert sft["dev_accuracy"] < 0.05 and 0.6 <= sft["dev_credit"] <= 0.85, sft
    meta = json.loads((DATA / "pairs.meta.json").read_text())
    assert meta["settings"] == dataclasses.asdict(long.PairSettings()) and meta["pairing"] == long.PAIRING
    assert meta["model_sha256"] == build.sha256_of(str(DATA / long.SFT_DIR / "model.safetensors"))
    assert build.meta_path(long.pairs_path()) == str(DATA / "pairs.meta.json")


def test_shipped_pairs_are_ranked_by_partial_credit_mostly_without_a_right_answer():
    from vrpo.training.data import read_preference_rows

    rows = read_preference_rows(long.pairs_path())
    meta = json.loads((DATA / "pairs.meta.json").read_text())["stats"]
    assert len(rows) == meta["pairs"] and len({r["prompt"] for r in rows}) == len(rows)
    chosen = [long.grade(r["prompt"], r["chosen"]) for r in rows]
    rejected = [long.grade(r["prompt"], r["rejected"]) for r in rows]
    assert all(c.credit > r.credit for c, r in zip(chosen, rejected)) and all(r["rejected"] for r in rows)
    not_exact = sum(not c.correct for c in chosen) / len(rows)
    assert not_exact == pytest.approx(meta["chosen_not_exact"]) and not_exact > 0.5
    assert build.margin_stats(rows) == meta["margin"]
    margins = {round(c.credit - r.credit, 6) for c, r in zip(chosen, rejected)}
    assert len(margins) >= 10 and meta["margin"]["sd"] > 0.05  # the margin varies
    assert all(8 <= len(r["prompt"].split()) - 1 <= 16 for r in rows)


def test_shipped_sft_model_sorts_as_recorded(torch_state):
    from vrpo.models import load_llada

    size = sum(p.stat().st_size for p in pathlib.Path(long.sft_path()).iterdir())
    assert size < 4 * 2**20, size
    sft = json.loads((DATA / long.SFT_DIR / sort.SFT_SETTINGS_FILE).read_text())
    torch.set_num_threads(sort.THREADS)  # the builder's thread count (and fast on a busy CPU)
    model = load_llada(long.sft_path(), attn_implementation="sdpa")
    report = sort.evaluate_generations(model, sort.task_tokenizer(), long.dev_prompts())
    # The recorded dev figures are this model's (up to an argmax tie flipped by another torch build).
    assert abs(report.accuracy - sft["dev_accuracy"]) <= 1 / 256, (report.accuracy, sft["dev_accuracy"])
    assert abs(report.credit - sft["dev_credit"]) <= 0.005, (report.credit, sft["dev_credit"])


def test_package_data_globs_cover_the_shipped_files():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["vrpo.tasks.sort_long"]
    shipped = [p.relative_to(DATA.parent).as_posix() for p in DATA.rglob("*") if p.is_file()]
    assert {"data/pairs.jsonl", "data/pairs.meta.json", "data/sft_model/model.safetensors"} <= set(shipped)
    missing = [f for f in shipped if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"pyproject.toml's package-data misses {missing}"


def test_test_prompts_are_fixed_distinct_balanced_and_never_trained_on():
    prompts = long.test_prompts()
    assert prompts == long.test_prompts() and len(set(prompts)) == len(prompts) == long.TEST_PROMPTS
    shipped = {json.loads(line)["prompt"] for line in (DATA / long.PAIRS_FILE).read_text().splitlines()}
    assert not shipped & set(prompts) and not set(long.dev_prompts()) & set(prompts)
    counts = [sum(len(p.split()) - 1 == k for p in prompts) for k in range(8, 17)]
    assert sum(counts) == len(prompts) and max(counts) - min(counts) <= 1, counts
    assert SORT_LONG_TASK.test_prompts() == prompts and not set(prompts) & set(sort.test_prompts())


def test_the_task_is_a_graded_task_with_its_own_files_and_presets():
    assert get_task("sort_long") is SORT_LONG_TASK and get_task("sort") is sort.SORT_TASK
    assert isinstance(SORT_LONG_TASK, GradedTask)
    assert SORT_LONG_TASK.model_path() == long.sft_path() != sort.SORT_TASK.model_path()
    assert SORT_LONG_TASK.pairs_path() == long.pairs_path()
    # The longest prompt with its answer fits the preset's max_length and the model's positions.
    tokenizer = SORT_LONG_TASK.tokenizer()
    longest = sort.prompt_of([9] * 8 + [0] * 8)
    tokens = len(sort.encode_example(tokenizer, longest, sort.reference_answer(longest))["input_ids"])
    assert tokens <= SORT_LONG_TASK.presets["max_length"] <= sort.MODEL_SHAPE["max_sequence_length"]
    assert SORT_LONG_TASK.reward(longest, sort.reference_answer(longest)) == 1.0
    assert SORT_LONG_TASK.answer_length(tokenizer, longest) == 33


def test_task_flag_names_itself_for_an_unknown_task(capsys, tmp_path):
    from vrpo.train import main

    assert main(["--task", "sort_longer", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--task" in err and "'sort_longer'" in err and all(name in err for name in TASKS), err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--task must be one of sort, sort_long"):
        get_task("")


def test_task_flag_picks_the_task_the_trainer_gets(monkeypatch, tmp_path):
    import vrpo.train

    got = []

    class Stop(ValueError):
        pass

    def trainer(config, task):
        got.append((config.task, task))
        raise Stop("stop before building")

    monkeypatch.setattr(vrpo.train, "trainer_for", trainer)
    for argv, name in (
        ([], "sort_long"),
        (["--task", "sort"], "sort"),
        (["--task", "sort_long"], "sort_long"),
        (["--task", "sort_long", "--algorithm", "grpo"], "sort_long"),
    ):
        assert vrpo.train.main([*argv, "--output_dir", str(tmp_path / "run")]) == 2
        assert got.pop() == (name, TASKS[name])


def test_help_lists_every_task(capsys):
    from vrpo.training.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--task" in text and all(f"{name} (" in text for name in TASKS)


def test_plan_reads_the_tasks_model_and_presets():
    from vrpo.plan import resolved
    from vrpo.training.config import VRPOConfig

    assert resolved(VRPOConfig(task="sort_long")).max_length == long.PRESETS["max_length"]
    assert resolved(VRPOConfig(task="sort")).max_length == sort.PRESETS["max_length"]
    assert resolved(VRPOConfig()).max_length == long.PRESETS["max_length"]  # the default task
    with pytest.raises(ValueError, match="--task"):
        resolved(VRPOConfig(task="nope"))


def test_shared_prompt_streams_keep_the_demos_draws():
    # The demo's pair prompts are drawn as before the lengths became a parameter: its shipped pairs' prompts
    # are among them (a changed draw would give other prompts).
    lines = (ROOT / "vrpo" / "tasks" / "sort" / "data" / sort.PAIRS_FILE).read_text().splitlines()
    shipped = [json.loads(line)["prompt"] for line in lines]
    drawn = sort.pair_prompts(sort.PairSettings())
    assert [p for p in drawn if p in set(shipped)] == shipped


def test_dev_prompts_never_hold_a_test_prompt():
    """``--gen_eval_split dev`` chooses settings on these: a test prompt among them would tune on the test set."""
    for task in TASKS.values():
        dev = task.dev_prompts()
        assert len(dev) == 256 and not set(dev) & set(task.test_prompts())
