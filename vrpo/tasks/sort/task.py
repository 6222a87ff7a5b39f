"""The embedded demo task: sort a short list of digits, with a verifier.

A prompt is ``"sort 5 2 8"``; the right answer is ``"2 5 8"``. Answers are checkable, so the task has
a verifiable reward (:func:`grade`: exact sort, and partial credit = the fraction of positions right),
which is what makes the effect of preference optimisation visible in the model's own generations.

The default run (``python -m vrpo.train``) starts from a small LLaDA that can already sort some
lists, trained with the masked-diffusion SFT objective, and learns from its own answers ranked by the
verifier. Both are package data, and both are rebuilt bit for bit by this module's commands::

    python -m vrpo.toy sft --output_dir vrpo/data_files/toy_sft --overwrite
    python -m vrpo.toy pairs --model vrpo/data_files/toy_sft --output vrpo/data_files/toy_pairs.jsonl --overwrite
    python -m vrpo.toy synthetic OUT.jsonl      # the older synthetic pairs (toy_sort.jsonl); --overwrite to replace

The commands fix the seed, the number of CPU threads and deterministic algorithms, so the same
command gives the same bytes on the same CPU and torch build.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import torch

TOY_FILE = "toy_sort.jsonl"
SFT_DIR = "toy_sft"
PAIRS_FILE = "toy_pairs.jsonl"
SFT_SETTINGS_FILE = "sft_settings.json"
THREADS = 1  # fixed: float sums depend on how a matmul is split between threads

# The SFT model's shape: d_model 64, 4 heads, 2 layers, FFN 192, a 136-token character vocabulary.
MODEL_SHAPE = dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=128 + 8, max_sequence_length=128)


# --------------------------------------------------------------------------------------------- the task


LENGTHS = (3, 6)  # a prompt has 3 to 6 digits


def random_digits(rng: random.Random, k: int | None = None) -> list[int]:
    """``k`` digits (default: 3 to 6, uniform), not all equal."""
    k = rng.randint(*LENGTHS) if k is None else k
    digits = [rng.randint(0, 9) for _ in range(k)]
    while len(set(digits)) == 1:
        digits = [rng.randint(0, 9) for _ in range(k)]
    return digits


def _fmt(xs) -> str:
    return " ".join(map(str, xs))


def prompt_of(digits: Sequence[int]) -> str:
    return f"sort {_fmt(digits)}"


def reference_answer(prompt: str) -> str:
    """The right answer to a ``"sort ..."`` prompt."""
    return _fmt(sorted(prompt.split()[1:]))


@dataclass(frozen=True)
class Grade:
    """The verifier's verdict on one answer: ``correct`` (exact sort) and ``credit`` in [0, 1]."""

    correct: bool
    credit: float


def grade(prompt: str, answer: str) -> Grade:
    """Grade ``answer`` to ``prompt``: credit is the fraction of positions holding the right digit,
    over the longer of the answer and the right one (so extra or missing items cost credit)."""
    want = reference_answer(prompt).split()
    got = answer.split()
    right = sum(a == b for a, b in zip(got, want))
    return Grade(got == want, right / max(len(want), len(got)))


def is_correct(prompt: str, answer: str) -> bool:
    """True when ``answer`` is the prompt's digits in ascending order."""
    return grade(prompt, answer).correct


def make_pair(rng: random.Random) -> dict:
    """A synthetic pair: the sorted list against a wrong order of the same digits (same length)."""
    digits = random_digits(rng)
    k = len(digits)
    answer = sorted(digits)
    kind = rng.random()
    if kind < 0.4:  # one adjacent swap: the hardest negatives
        wrong = list(answer)
        candidates = [i for i in range(k - 1) if wrong[i] != wrong[i + 1]]
        i = rng.choice(candidates)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    elif kind < 0.6:
        wrong = sorted(digits, reverse=True)
    else:
        wrong = list(digits)
        while wrong == answer:
            rng.shuffle(wrong)
    return {"prompt": prompt_of(digits), "chosen": _fmt(answer), "rejected": _fmt(wrong)}


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def data_file(name: str) -> str:
    return str(resources.files("vrpo") / "data_files" / name)


def toy_dataset_path() -> str:
    """Path of the bundled synthetic toy preference set (JSON Lines)."""
    return data_file(TOY_FILE)


def toy_pairs_path() -> str:
    """Path of the bundled on-policy preference set of the SFT model (JSON Lines, TRL's format)."""
    return data_file(PAIRS_FILE)


def toy_sft_path() -> str:
    """Directory of the bundled SFT model (LLaDA's checkpoint format; its tokenizer is :func:`toy_tokenizer`)."""
    return data_file(SFT_DIR)


def toy_tokenizer():
    """The toy model's character-level tokenizer with LLaDA's special tokens (built, not loaded)."""
    from .models import build_tiny_tokenizer

    return build_tiny_tokenizer(vocab_size=MODEL_SHAPE["vocab_size"])


# --------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplerSettings:
    """LLaDA's sampler as the toy task uses it: the answer's length is known from the prompt (its digits,
    ``<|eot_id|>`` and EOS), one denoising step per token, one block, low-confidence remasking."""

    temperature: float = 0.0
    remasking: str = "low_confidence"
    seed: int = 0


EVAL_SAMPLER = SamplerSettings(temperature=0.0)  # what the run reports: greedy, so seed-free


def _cut_answer(tokenizer, ids: list[int]) -> str:
    """The answer text: the characters before the first non-character token (``<|eot_id|>``, EOS, a
    mask, or a reserved filler, which would otherwise decode to its long name)."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    end = next((i for i, t in enumerate(tokens) if t.startswith("<|")), len(ids))
    return tokenizer.decode(ids[:end]).strip()


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: Sequence[str], sampler: SamplerSettings, n: int = 1,
                   batch_size: int = 256) -> list[list[str]]:
    """``n`` answers per prompt from LLaDA's sampler (:func:`vrpo.generate.generate`).

    Prompts of one token length are batched together (no padding); each batch draws from its own
    generator, seeded from ``sampler.seed`` and the batch's position, so the answers do not depend on
    anything but the prompts, ``n`` and the settings. Returns ``answers[i][j]``, prompt ``i``'s ``j``-th.
    """
    from .generate import generate
    from .tokenization import encode_example, get_mask_token_id

    mask_id = get_mask_token_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    groups: dict[tuple[int, int], list[int]] = {}
    encoded = []
    for i, prompt in enumerate(prompts):
        enc = encode_example(tokenizer, prompt, reference_answer(prompt))
        p_len = len(enc["input_ids"]) - sum(enc["response_mask"])
        encoded.append(enc["input_ids"][:p_len])
        groups.setdefault((p_len, sum(enc["response_mask"])), []).append(i)
    answers: list[list[str]] = [[] for _ in prompts]
    batch_no = 0
    for key in sorted(groups):
        p_len, gen_length = key
        rows = [(i, j) for i in groups[key] for j in range(n)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            g = torch.Generator(device=device).manual_seed(sampler.seed * 1_000_003 + batch_no)
            batch_no += 1
            prompt_ids = torch.tensor([encoded[i] for i, _ in chunk], dtype=torch.long, device=device)
            out = generate(model, prompt_ids, mask_id, gen_length=gen_length, steps=gen_length,
                           temperature=sampler.temperature, remasking=sampler.remasking, generator=g)
            for (i, _), ids in zip(chunk, out[:, p_len:].tolist()):
                answers[i].append(_cut_answer(tokenizer, ids))
    model.train(was_training)
    return answers


@dataclass(frozen=True)
class GenerationReport:
    """Held-out generation quality: exact-sort accuracy, mean partial credit, and the graded samples."""

    accuracy: float
    credit: float
    samples: list[dict]


def evaluate_generations(model, tokenizer, prompts: Sequence[str], sampler: SamplerSettings = EVAL_SAMPLER) -> GenerationReport:
    """Generate one answer per prompt and grade it."""
    answers = [a[0] for a in sample_answers(model, tokenizer, prompts, sampler)]
    grades = [grade(p, a) for p, a in zip(prompts, answers)]
    samples = [{"prompt": p, "answer": a, "correct": g.correct, "credit": g.credit}
               for p, a, g in zip(prompts, answers, grades)]
    n = max(len(prompts), 1)
    return GenerationReport(sum(g.correct for g in grades) / n, sum(g.credit for g in grades) / n, samples)


def describe_sample(sample: dict) -> str:
    """One graded sample for the closing summary: ``'sort 5 2 8' -> '2 5 8' [correct]``."""
    verdict = "correct" if sample["correct"] else f"wrong, credit {sample['credit']:.2f}"
    return f"{sample['prompt']!r} -> {sample['answer']!r} [{verdict}]"


@dataclass(frozen=True)
class GradedTask:
    """A bundled task with a verifier: how a run grades the policy's generations (``evaluate(model,
    tokenizer, prompts)``, see :func:`evaluate_generations`) on the task's own test prompts (``test_prompts()``)."""

    name: str
    evaluate: Callable[..., GenerationReport]
    test_prompts: Callable[[], list[str]]


def generation_metrics(report: GenerationReport) -> dict[str, float]:
    """A generation report as logged metrics."""
    return {"eval/gen_acc": report.accuracy, "eval/gen_credit": report.credit}


# --------------------------------------------------------------------------------------------- SFT


@dataclass(frozen=True)
class SFTSettings:
    """``python -m vrpo.toy sft``: the masked-diffusion SFT objective (:func:`vrpo.losses.mdm_sft_loss`,
    LLaDA's negative ELBO per response token, l-uniform estimator) on a seeded stream of correct sorts."""

    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    dev_prompts: int = 256  # SFT's own validation prompts (seed + 1), reported in sft_settings.json


def deterministic_cpu(seed: int):
    """What the commands' bit-for-bit reproducibility rests on: seed, thread count, deterministic ops."""
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def train_sft(settings: SFTSettings, log=print):
    """Train the toy SFT model from a seeded random init. Returns ``(model, tokenizer)``."""
    from transformers import get_cosine_schedule_with_warmup

    from .elbo import elbo_terms
    from .losses import mdm_sft_loss
    from .models import build_tiny_llada
    from .sampling import SamplingPlan, draw_masks
    from .tokenization import collate, encode_example

    tokenizer = toy_tokenizer()
    model = build_tiny_llada(seed=settings.seed, attn_implementation="sdpa", **MODEL_SHAPE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95),
                            weight_decay=settings.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, settings.steps)
    rng = random.Random(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    plan = SamplingPlan(n_t=1)
    for step in range(settings.steps):
        rows = []
        for _ in range(settings.batch_size):
            prompt = prompt_of(random_digits(rng))
            rows.append(encode_example(tokenizer, prompt, reference_answer(prompt)))
        batch = collate(rows, tokenizer.pad_token_id)
        draw = draw_masks(batch["response_mask"], plan, generator=g, impl="torch")
        terms = elbo_terms(model, batch["input_ids"], batch["response_mask"], draw, tokenizer.mask_token_id,
                           model_kwargs={"attention_mask": batch["attention_mask"]}, fused=False)
        loss = mdm_sft_loss(terms, batch["response_mask"].sum(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == settings.steps:
            log(f"sft step {step + 1}/{settings.steps}: loss {loss.item():.4f}")
    return model.eval(), tokenizer


def distinct_prompts(rng: random.Random, n: int, seen: set[str], k: int | None = None) -> list[str]:
    """``n`` prompts drawn from ``rng`` (``k`` digits, default any length) that are not in ``seen`` and
    not repeated; ``seen`` grows by the ones returned."""
    out = []
    while len(out) < n:
        prompt = prompt_of(random_digits(rng, k))
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def dev_prompts(seed: int, n: int) -> list[str]:
    """Prompts for checking a command's output, from their own seed (never the run's held-out split)."""
    rng = random.Random(f"dev/{seed}")
    return [prompt_of(random_digits(rng)) for _ in range(n)]


TEST_PROMPTS = 1024


def test_prompts(n: int = TEST_PROMPTS) -> list[str]:
    """The held-out test set on which a run grades generations before and after training: ``n`` distinct
    prompts from their own seed stream, as many of each length as the task has (it draws the length
    uniformly), none of them a prompt of the bundled pairs (trained on or held out for preference
    accuracy) or an SFT dev prompt. The same for every run and seed, and never used to choose a setting.
    (Drawing distinct unseen prompts without fixing the lengths would under-represent 3 digits: there
    are only 990 such prompts, and the pairs hold a third of them.)"""
    seen = set(pair_prompts(PairSettings())) | set(dev_prompts(SFTSettings.seed, SFTSettings.dev_prompts))
    rng = random.Random("test/0")
    lengths = range(LENGTHS[0], LENGTHS[1] + 1)
    out = []
    for i, k in enumerate(lengths):
        out += distinct_prompts(rng, (n * (i + 1)) // len(lengths) - (n * i) // len(lengths), seen, k)
    random.Random("test/order").shuffle(out)  # so that the first samples shown are of every length
    return out


SORT_TASK = GradedTask("sort digits", evaluate_generations, test_prompts)


def graded_task(cfg) -> GradedTask | None:
    """The run's verifier: the sorting task's when the run trains on the bundled pairs (no ``--dataset``).
    A user's data is never graded, even when it happens to be about sorting."""
    return SORT_TASK if cfg.toy_task else None


def _refuse_overwrite(path: str, overwrite: bool):
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def sft_command(output_dir: str, settings: SFTSettings, overwrite: bool = False) -> dict:
    """Train, check on the dev prompts, and write the model (LLaDA's format) and its settings."""
    from .checkpoint import atomic_write_text
    from .models import save_llada

    _refuse_overwrite(output_dir, overwrite)
    deterministic_cpu(settings.seed)
    model, tokenizer = train_sft(settings)
    dev = evaluate_generations(model, tokenizer, dev_prompts(settings.seed, settings.dev_prompts))
    record = {"settings": dataclasses.asdict(settings), "sampler": dataclasses.asdict(EVAL_SAMPLER),
              "model_shape": MODEL_SHAPE, "threads": THREADS, "torch": torch.__version__,
              "dev_accuracy": dev.accuracy, "dev_credit": dev.credit,
              "parameters": sum(p.numel() for p in model.parameters())}
    save_llada(model, output_dir)
    atomic_write_text(os.path.join(output_dir, SFT_SETTINGS_FILE), json.dumps(record, indent=1) + "\n")
    return record


# --------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairSettings:
    """``python -m vrpo.toy pairs``: ``samples`` answers per prompt from the SFT model at
    ``temperature``, paired by :func:`rank_pair` (a right answer against the nearest wrong one)."""

    prompts: int = 1500
    samples: int = 8
    temperature: float = 1.0
    seed: int = 0


def pair_prompts(settings: PairSettings) -> list[str]:
    """Distinct prompts, from the pairs' own seed stream."""
    return distinct_prompts(random.Random(f"pairs/{settings.seed}"), settings.prompts, seen=set())


def rank_pair(prompt: str, answers: Sequence[str]) -> dict | None:
    """``{"prompt", "chosen", "rejected"}``: the first exact answer against the best-graded wrong one (the
    nearest miss; ties go to the earliest sample), or None unless some answers are right and some wrong.

    Near misses are the model's own likeliest mistakes; against the worst answer (often junk the greedy
    sampler never writes) the toy run's exact-sort accuracy barely moved (README). Empty answers (the
    turn ended at once) are left out: a preference row needs text on both sides.
    """
    graded = [(a, grade(prompt, a)) for a in answers if a]
    right = [a for a, g in graded if g.correct]
    wrong = [(g.credit, -j, a) for j, (a, g) in enumerate(graded) if not g.correct]
    if not right or not wrong:
        return None
    return {"prompt": prompt, "chosen": right[0], "rejected": max(wrong)[2]}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def meta_path(pairs_path: str) -> str:
    """Where the pairs' settings and statistics go: ``X.jsonl`` -> ``X.meta.json``."""
    return os.path.splitext(pairs_path)[0] + ".meta.json"


def pairs_command(model_dir: str, output: str, settings: PairSettings, overwrite: bool = False) -> dict:
    """Sample, grade, pair; write the JSONL and its ``.meta.json`` (settings, statistics, model hash)."""
    from .checkpoint import atomic_write_text
    from .models import load_llada

    _refuse_overwrite(output, overwrite)
    deterministic_cpu(settings.seed)
    model = load_llada(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = toy_tokenizer()
    prompts = pair_prompts(settings)
    sampler = SamplerSettings(temperature=settings.temperature, seed=settings.seed)
    answers = sample_answers(model, tokenizer, prompts, sampler, n=settings.samples)
    pairs = [p for p in (rank_pair(q, a) for q, a in zip(prompts, answers)) if p is not None]
    grades = [grade(q, a) for q, row in zip(prompts, answers) for a in row]
    stats = {
        "prompts": len(prompts), "pairs": len(pairs), "samples": len(grades),
        "sample_accuracy": sum(g.correct for g in grades) / len(grades),
        "sample_credit": sum(g.credit for g in grades) / len(grades),
        "chosen_correct": sum(grade(p["prompt"], p["chosen"]).correct for p in pairs) / max(len(pairs), 1),
        "rejected_correct": sum(grade(p["prompt"], p["rejected"]).correct for p in pairs) / max(len(pairs), 1),
    }
    record = {"settings": dataclasses.asdict(settings), "threads": THREADS, "torch": torch.__version__,
              "model_sha256": sha256_of(os.path.join(model_dir, "model.safetensors")), "stats": stats}
    atomic_write_text(output, "".join(json.dumps(p) + "\n" for p in pairs))
    atomic_write_text(meta_path(output), json.dumps(record, indent=1) + "\n")
    return record


# --------------------------------------------------------------------------------------------- CLI


def _add_settings(parser: argparse.ArgumentParser, cls):
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"default {f.default}")


def _settings(cls, args) -> object:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrpo.toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="train the SFT starting policy")
    sft.add_argument("--output_dir", required=True)
    sft.add_argument("--overwrite", action="store_true")
    _add_settings(sft, SFTSettings)
    pairs = sub.add_parser("pairs", help="sample, grade and pair the SFT model's answers")
    pairs.add_argument("--model", required=True, help="an SFT model directory (python -m vrpo.toy sft)")
    pairs.add_argument("--output", required=True, help="the JSONL to write (and X.meta.json beside it)")
    pairs.add_argument("--overwrite", action="store_true")
    _add_settings(pairs, PairSettings)
    syn = sub.add_parser("synthetic", help="the synthetic pairs of toy_sort.jsonl")
    syn.add_argument("output")
    syn.add_argument("--n", type=int, default=2000)
    syn.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "sft":
            record = sft_command(args.output_dir, _settings(SFTSettings, args), args.overwrite)
            print(f"wrote {args.output_dir}: {record['parameters']} parameters, dev exact-sort accuracy "
                  f"{record['dev_accuracy']:.1%} (credit {record['dev_credit']:.3f})")
        elif args.command == "pairs":
            record = pairs_command(args.model, args.output, _settings(PairSettings, args), args.overwrite)
            print(f"wrote {args.output}: {json.dumps(record['stats'])}")
        else:
            from .checkpoint import atomic_write_text

            _refuse_overwrite(args.output, args.overwrite)
            atomic_write_text(args.output, "".join(json.dumps(pair) + "\n" for pair in make_pairs(args.n, seed=0)))
            print(f"wrote {args.n} pairs to {args.output}")
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"vrpo.toy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
