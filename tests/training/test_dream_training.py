"""``python -m vrpo.train`` on a Dream checkpoint with Dream's real tokenizer, end to end.

The checkpoint: the tiny Dream fixture's transformer blocks with its embedding and head grown from 300 to
Dream's 152,064 rows, so that the real tokenizer's ids fit (rows 0-299 are the fixture's, the new rows
transformers' seeded N(0, 0.02) initialisation), and Dream-v0-Instruct-7B's tokenizer files alongside.
The task: the chosen answer is a fruit, the rejected one a tool; a random model prefers either at chance.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from vrpo.models import family_of, load_mdm
from vrpo.models.tiny import build_tiny_tokenizer

from ..helpers import FIXTURES, run_cli

pytestmark = pytest.mark.slow

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
FRUITS = "apple banana cherry grape lemon mango orange peach pear plum".split()
TOOLS = "hammer wrench saw drill chisel pliers shovel rake axe file".split()
QUICK = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--n_t",
    "2",
    "--eval_size",
    "8",
    "--eval_n_t",
    "2",
    "--max_length",
    "64",
    "--num_samples",
    "1",
    "--gen_length",
    "4",
    "--report_to",
    "none",
    "--save_steps",
    "0",
    "--overwrite_output_dir",
]


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    from vrpo.models import load_dream, save_dream

    out = tmp_path_factory.mktemp("dream") / "ckpt"
    model = load_dream(FIXTURES / "dream-tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.resize_token_embeddings(152064, mean_resizing=False)
    model.config.update(dict(mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, bos_token_id=151643))
    save_dream(model, out)
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURES / "dream-7b-instruct-meta" / name, out / name)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [
        {"prompt": f"Name something, please ({i}).", "chosen": rng.choice(FRUITS), "rejected": rng.choice(TOOLS)}
        for i in range(240)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_twenty_steps_learn_the_preference(dream_dir, pairs, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        [
            "--model_name_or_path",
            str(dream_dir),
            "--dataset",
            str(pairs),
            "--output_dir",
            str(out),
            "--max_steps",
            "20",
            "--per_device_train_batch_size",
            "8",
            "--n_t",
            "2",
            "--learning_rate",
            "5e-3",
            "--warmup_steps",
            "2",
            "--eval_size",
            "40",
            "--eval_n_t",
            "8",
            "--max_length",
            "64",
            "--num_samples",
            "2",
            "--gen_length",
            "4",
            "--report_to",
            "none",
            "--save_steps",
            "0",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"Dream 20 steps: held-out preference accuracy {summary['pref_acc_before']:.3f} -> "
        f"{summary['pref_acc_after']:.3f}"
    )
    assert summary["pref_acc_after"] >= summary["pref_acc_before"] + 0.1, summary
    assert "Dream" in result.stdout, "the summary names the family's sampler"
    assert len(summary["samples"]) == 2 and "correct" not in summary["samples"][0]
    # The final model is in Dream's format with a tokenizer that loads without remote code.
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and "auto_map" not in cfg
    assert "auto_map" not in json.loads((out / "model" / "tokenizer_config.json").read_text())
    model = load_mdm(out / "model")
    assert family_of(model).name == "dream" and model.config.vocab_size == 152064


@pytest.mark.parametrize(
    "flags",
    [
        ["--use_lora", "--packing", "--gradient_checkpointing", "--attn_implementation", "vrpo_triton"],
        ["--precompute_ref", "--no_fused_head", "--attn_implementation", "eager", "--naive_dpo"],
        ["--torch_dtype", "bfloat16", "--stratified", "--n_yt", "2", "--loss_type", "ipo"],
    ],
    ids=["lora-packing-ckpt-triton", "precompute-unfused-eager-naive", "bf16-stratified-ipo"],
)
def test_llada_flags_work_for_dream(dream_dir, pairs, tmp_path, flags):
    out = tmp_path / "run"
    result = run_cli(
        ["--model_name_or_path", str(dream_dir), "--dataset", str(pairs), "--output_dir", str(out), *QUICK, *flags]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "Dream"


def test_reference_checkpoint_and_resume(dream_dir, pairs, tmp_path):
    out = tmp_path / "run"
    common = [
        "--model_name_or_path",
        str(dream_dir),
        "--dataset",
        str(pairs),
        "--output_dir",
        str(out),
        "--ref_model_name_or_path",
        str(dream_dir),
        *QUICK,
    ]
    common += ["--max_steps", "3", "--save_steps", "1"]
    killed = run_cli(common, env={"VRPO_KILL_AT": "step:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli(common + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_tiny_llada_tokenizer_with_a_dream_model_is_refused(dream_dir, pairs, tmp_path):
    """A tokenizer of another family than the model's is an error before training, not a silent mismatch."""
    tok_dir = tmp_path / "llada_tok"
    build_tiny_tokenizer().save_pretrained(tok_dir)
    result = run_cli(
        [
            "--model_name_or_path",
            str(dream_dir),
            "--tokenizer_name_or_path",
            str(tok_dir),
            "--dataset",
            str(pairs),
            "--output_dir",
            str(tmp_path / "run"),
            *QUICK,
        ]
    )
    assert result.returncode == 2 and "vrpo.train: error:" in result.stderr
    assert "LLaDA" in result.stderr and "Dream" in result.stderr, result.stderr[-2000:]
