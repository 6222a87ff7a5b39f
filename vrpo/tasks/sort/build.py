"""Rebuilding the sorting demo's package data bit for bit: the SFT starting model and its on-policy pairs.

    python -m vrpo.tasks.sort sft --output_dir vrpo/tasks/sort/data/sft_model --overwrite
    python -m vrpo.tasks.sort pairs --model vrpo/tasks/sort/data/sft_model \
        --output vrpo/tasks/sort/data/pairs.jsonl --overwrite
    python -m vrpo.tasks.sort synthetic OUT.jsonl      # the older synthetic pairs (synthetic_pairs.jsonl)

The commands fix the seed, the number of CPU threads and deterministic algorithms, so the same command gives
the same bytes on the same CPU and torch build. None overwrites a file without ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Sequence

import torch
from transformers import get_cosine_schedule_with_warmup

from ...estimator import HeadOptions, SamplingPlan, draw_masks, elbo_terms, mdm_sft_loss
from ...files import atomic_write_text
from ...models import build_tiny_llada, collate, encode_example, load_llada, save_llada
from .task import (
    EVAL_SAMPLER,
    LENGTHS,
    MODEL_SHAPE,
    SFT_SETTINGS_FILE,
    THREADS,
    PairSettings,
    SamplerSettings,
    SFTSettings,
    dev_prompts,
    evaluate_generations,
    grade,
    make_pairs,
    pair_prompts,
    prompt_of,
    random_digits,
    reference_answer,
    sample_answers,
    task_tokenizer,
)

# --------------------------------------------------------------------------------------------- SFT


def deterministic_cpu(seed: int):
    """What the commands' bit-for-bit reproducibility rests on: seed, thread count, deterministic ops."""
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def train_sft(settings: SFTSettings, log=print, lengths: tuple[int, int] = LENGTHS):
    """Train the toy SFT model from a seeded random init on right sorts of ``lengths[0]`` to ``lengths[1]``
    digits. Returns ``(model, tokenizer)``."""
    tokenizer = task_tokenizer()
    model = build_tiny_llada(seed=settings.seed, attn_implementation="sdpa", **MODEL_SHAPE).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    sched = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, settings.steps)
    rng = random.Random(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    plan = SamplingPlan(n_t=1)
    for step in range(settings.steps):
        rows = []
        for _ in range(settings.batch_size):
            prompt = prompt_of(random_digits(rng, lengths=lengths))
            rows.append(encode_example(tokenizer, prompt, reference_answer(prompt)))
        batch = collate(rows, tokenizer.pad_token_id)
        draw = draw_masks(batch["response_mask"], plan, generator=g, impl="torch")
        terms = elbo_terms(
            model,
            batch["input_ids"],
            batch["response_mask"],
            draw,
            tokenizer.mask_token_id,
            model_kwargs={"attention_mask": batch["attention_mask"]},
            head=HeadOptions(fused=False),
        )
        loss = mdm_sft_loss(terms, batch["response_mask"].sum(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == settings.steps:
            log(f"sft step {step + 1}/{settings.steps}: loss {loss.item():.4f}")
    return model.eval(), tokenizer


def _refuse_overwrite(path: str, overwrite: bool):
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def sft_command(
    output_dir: str, settings: SFTSettings, overwrite: bool = False, lengths: tuple[int, int] = LENGTHS
) -> dict:
    """Train, check on the dev prompts, and write the model (LLaDA's format) and its settings."""
    _refuse_overwrite(output_dir, overwrite)
    deterministic_cpu(settings.seed)
    model, tokenizer = train_sft(settings, lengths=lengths)
    dev = evaluate_generations(model, tokenizer, dev_prompts(settings.seed, settings.dev_prompts, lengths))
    record = {
        "settings": dataclasses.asdict(settings),
        "sampler": dataclasses.asdict(EVAL_SAMPLER),
        "model_shape": MODEL_SHAPE,
        "threads": THREADS,
        "torch": torch.__version__,
        "dev_accuracy": dev.accuracy,
        "dev_credit": dev.credit,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_llada(model, output_dir)
    tokenizer.save_pretrained(output_dir)  # so that the folder loads like any checkpoint (vrpo.eval, ...)
    atomic_write_text(os.path.join(output_dir, SFT_SETTINGS_FILE), json.dumps(record, indent=1) + "\n")
    return record


# --------------------------------------------------------------------------------------------- pairs


PAIRINGS = ("right_vs_nearest", "best_vs_worst")  # rank_pair's rules: the demo's, the long-sorting task's


def rank_pair(prompt: str, answers: Sequence[str], pairing: str = "right_vs_nearest") -> dict | None:
    """``{"prompt", "chosen", "rejected"}`` from one prompt's sampled answers, ranked by the verifier's credit
    (ties go to the earlier sample), or None when no two answers' credits differ.

    * ``"right_vs_nearest"`` (the sorting demo): the first exact answer against the best-graded wrong one
      (None without an exact answer). Near misses are the model's own likeliest mistakes; against the worst
      answer (often junk the greedy sampler never writes) the demo run's exact-sort accuracy barely moved
      (docs/results.md).
    * ``"best_vs_worst"`` (preference data without gold answers): the best-graded answer, right or not,
      against the worst-graded one, as in on-policy pairs ranked by a reward model (SimPO, Meng et al. 2024,
      Section 3: highest against lowest score); the margin is whatever spread the samples have.

    Empty answers (the turn ended at once) are left out: a preference row needs text on both sides.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    graded = [(grade(prompt, a), j, a) for j, a in enumerate(answers) if a]
    ranked = sorted(graded, key=lambda row: (-row[0].credit, row[1]))  # best first, then earliest
    if not ranked or (pairing == "right_vs_nearest" and not ranked[0][0].correct):
        return None
    below = [row for row in ranked if row[0].credit < ranked[0][0].credit]
    if not below:
        return None
    if pairing == "right_vs_nearest":
        return {"prompt": prompt, "chosen": ranked[0][2], "rejected": below[0][2]}
    worst = min(below, key=lambda row: (row[0].credit, row[1]))
    return {"prompt": prompt, "chosen": ranked[0][2], "rejected": worst[2]}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def meta_path(pairs_path: str) -> str:
    """Where the pairs' settings and statistics go: ``X.jsonl`` -> ``X.meta.json``."""
    return os.path.splitext(pairs_path)[0] + ".meta.json"


def margin_stats(pairs: Sequence[dict]) -> dict:
    """How far each pair's chosen answer is graded above its rejected one (credit difference): mean, sd,
    quantiles, and a histogram of tenths (``"0.1"``: margins in [0.1, 0.2); the last bin holds 1.0)."""
    margins = sorted(grade(p["prompt"], p["chosen"]).credit - grade(p["prompt"], p["rejected"]).credit for p in pairs)
    if not margins:
        return {}
    n = len(margins)
    mean = sum(margins) / n
    bins = [0] * 10
    for m in margins:
        bins[min(int(m * 10 + 1e-9), 9)] += 1
    return {
        "mean": mean,
        "sd": (sum((m - mean) ** 2 for m in margins) / n) ** 0.5,
        **{f"p{q}": margins[min(n - 1, q * n // 100)] for q in (0, 10, 25, 50, 75, 90)},
        "max": margins[-1],
        "histogram": {f"{i / 10:.1f}": c for i, c in enumerate(bins)},
    }


def pairs_command(
    model_dir: str,
    output: str,
    settings: PairSettings,
    overwrite: bool = False,
    lengths: tuple[int, int] = LENGTHS,
    pairing: str = "right_vs_nearest",
) -> dict:
    """Sample, grade, pair (:func:`rank_pair`); write the JSONL and its ``.meta.json`` (settings,
    statistics, model hash; for a pairing other than the demo's also the share of pairs whose chosen answer
    is not exactly right and the margins' distribution, :func:`margin_stats`)."""
    _refuse_overwrite(output, overwrite)
    deterministic_cpu(settings.seed)
    model = load_llada(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = task_tokenizer()
    prompts = pair_prompts(settings, lengths)
    sampler = SamplerSettings(temperature=settings.temperature, seed=settings.seed)
    answers = sample_answers(model, tokenizer, prompts, sampler, n=settings.samples)
    pairs = [p for p in (rank_pair(q, a, pairing) for q, a in zip(prompts, answers)) if p is not None]
    grades = [grade(q, a) for q, row in zip(prompts, answers) for a in row]
    stats = {
        "prompts": len(prompts),
        "pairs": len(pairs),
        "samples": len(grades),
        "sample_accuracy": sum(g.correct for g in grades) / len(grades),
        "sample_credit": sum(g.credit for g in grades) / len(grades),
        "chosen_correct": sum(grade(p["prompt"], p["chosen"]).correct for p in pairs) / max(len(pairs), 1),
        "rejected_correct": sum(grade(p["prompt"], p["rejected"]).correct for p in pairs) / max(len(pairs), 1),
    }
    record = {
        "settings": dataclasses.asdict(settings),
        "threads": THREADS,
        "torch": torch.__version__,
        "model_sha256": sha256_of(os.path.join(model_dir, "model.safetensors")),
        "stats": stats,
    }
    if pairing != "right_vs_nearest":  # (the demo's shipped meta file has none of these: its rule is implied)
        record["pairing"] = pairing
        stats["chosen_not_exact"] = 1 - stats["chosen_correct"]
        stats["margin"] = margin_stats(pairs)
    atomic_write_text(output, "".join(json.dumps(p) + "\n" for p in pairs))
    atomic_write_text(meta_path(output), json.dumps(record, indent=1) + "\n")
    return record


def synthetic_command(output: str, n: int, overwrite: bool = False):
    """The synthetic pairs of ``synthetic_pairs.jsonl`` (seed 0): the sorted list against a wrong order."""
    _refuse_overwrite(output, overwrite)
    atomic_write_text(output, "".join(json.dumps(pair) + "\n" for pair in make_pairs(n, seed=0)))
