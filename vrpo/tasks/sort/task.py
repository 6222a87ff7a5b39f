"""The embedded demo task: sort a short list of digits, with a verifier.

A prompt is ``"sort 5 2 8"``; the right answer is ``"2 5 8"``. Answers are checkable, so the task has
a verifiable reward (:func:`grade`: exact sort, and partial credit = the fraction of positions right),
which is what makes the effect of preference optimisation visible in the model's own generations.

The default run (``python -m vrpo.train``) starts from a small LLaDA that can already sort some
lists, trained with the masked-diffusion SFT objective, and learns from its own answers ranked by the
verifier. Both are package data, rebuilt bit for bit by :mod:`vrpo.tasks.sort.build`
(``python -m vrpo.tasks.sort sft|pairs|synthetic``). :data:`SORT_TASK` is the task as a run sees it
(:class:`vrpo.training.GradedTask`).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch

from ...models import build_tiny_tokenizer, encode_example, generate, get_mask_token_id
from ...training.task import GenerationReport

# The package data, in data/ beside this module (rebuilt by :mod:`.build`).
SYNTHETIC_PAIRS_FILE = "synthetic_pairs.jsonl"
SFT_DIR = "sft_model"
PAIRS_FILE = "pairs.jsonl"
SFT_SETTINGS_FILE = "sft_settings.json"
THREADS = 1  # fixed: float sums depend on how a matmul is split between threads

# The SFT model's shape: d_model 64, 4 heads, 2 layers, FFN 192, a 136-token character vocabulary.
MODEL_SHAPE = dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=128 + 8, max_sequence_length=128)


# --------------------------------------------------------------------------------------------- the task


LENGTHS = (3, 6)  # a prompt has 3 to 6 digits; the other sorting tasks pass their own ``lengths``


def random_digits(rng: random.Random, k: int | None = None, lengths: tuple[int, int] = LENGTHS) -> list[int]:
    """``k`` digits (default: ``lengths[0]`` to ``lengths[1]``, uniform), not all equal."""
    k = rng.randint(*lengths) if k is None else k
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
    """Path of the task's package data file or folder ``name`` (in ``vrpo/tasks/sort/data/``)."""
    return str(resources.files("vrpo.tasks.sort") / "data" / name)


def synthetic_pairs_path() -> str:
    """Path of the bundled synthetic toy preference set (JSON Lines)."""
    return data_file(SYNTHETIC_PAIRS_FILE)


def pairs_path() -> str:
    """Path of the bundled on-policy preference set of the SFT model (JSON Lines, TRL's format)."""
    return data_file(PAIRS_FILE)


def sft_path() -> str:
    """Directory of the bundled SFT model (LLaDA's checkpoint format; its tokenizer is :func:`task_tokenizer`)."""
    return data_file(SFT_DIR)


def task_tokenizer():
    """The toy model's character-level tokenizer with LLaDA's special tokens (built, not loaded)."""
    return build_tiny_tokenizer(vocab_size=MODEL_SHAPE["vocab_size"])


# 0.1's names, kept for one release (they go in 0.3).
_RENAMED = {
    "toy_sft_path": "sft_path",
    "toy_pairs_path": "pairs_path",
    "toy_dataset_path": "synthetic_pairs_path",
    "toy_tokenizer": "task_tokenizer",
}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(
            f"vrpo.tasks.sort.task.{name} is {_RENAMED[name]}; the old name goes in vrpo 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
def sample_answers(
    model, tokenizer, prompts: Sequence[str], sampler: SamplerSettings, n: int = 1, batch_size: int = 256
) -> list[list[str]]:
    """``n`` answers per prompt from LLaDA's sampler (:func:`vrpo.models.generate`).

    Prompts of one token length are batched together (no padding); each batch draws from its own
    generator, seeded from ``sampler.seed`` and the batch's position, so the answers do not depend on
    anything but the prompts, ``n`` and the settings. Returns ``answers[i][j]``, prompt ``i``'s ``j``-th.
    """
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
            out = generate(
                model,
                prompt_ids,
                mask_id,
                gen_length=gen_length,
                steps=gen_length,
                temperature=sampler.temperature,
                remasking=sampler.remasking,
                generator=g,
            )
            for (i, _), ids in zip(chunk, out[:, p_len:].tolist()):
                answers[i].append(_cut_answer(tokenizer, ids))
    model.train(was_training)
    return answers


def evaluate_generations(
    model, tokenizer, prompts: Sequence[str], sampler: SamplerSettings = EVAL_SAMPLER
) -> GenerationReport:
    """Generate one answer per prompt and grade it."""
    answers = [a[0] for a in sample_answers(model, tokenizer, prompts, sampler)]
    grades = [grade(p, a) for p, a in zip(prompts, answers)]
    samples = [
        {"prompt": p, "answer": a, "correct": g.correct, "credit": g.credit}
        for p, a, g in zip(prompts, answers, grades)
    ]
    n = max(len(prompts), 1)
    return GenerationReport(sum(g.correct for g in grades) / n, sum(g.credit for g in grades) / n, samples)


def describe_sample(sample: dict) -> str:
    """One graded sample for the closing summary: ``'sort 5 2 8' -> '2 5 8' [correct]``."""
    verdict = "correct" if sample["correct"] else f"wrong, credit {sample['credit']:.2f}"
    return f"{sample['prompt']!r} -> {sample['answer']!r} [{verdict}]"


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SFTSettings:
    """``python -m vrpo.tasks.sort sft``: the masked-diffusion SFT objective (:func:`vrpo.estimator.mdm_sft_loss`,
    LLaDA's negative ELBO per response token, l-uniform estimator) on a seeded stream of correct sorts."""

    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    dev_prompts: int = 256  # SFT's own validation prompts (seed + 1), reported in sft_settings.json


def distinct_prompts(
    rng: random.Random, n: int, seen: set[str], k: int | None = None, lengths: tuple[int, int] = LENGTHS
) -> list[str]:
    """``n`` prompts drawn from ``rng`` (``k`` digits, default any of ``lengths``) that are not in ``seen``
    and not repeated; ``seen`` grows by the ones returned."""
    out = []
    while len(out) < n:
        prompt = prompt_of(random_digits(rng, k, lengths))
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def dev_prompts(seed: int, n: int, lengths: tuple[int, int] = LENGTHS) -> list[str]:
    """Prompts for checking a command's output, from their own seed (never the run's held-out split)."""
    rng = random.Random(f"dev/{seed}")
    return [prompt_of(random_digits(rng, lengths=lengths)) for _ in range(n)]


TEST_PROMPTS = 1024


def test_prompts(n: int = TEST_PROMPTS) -> list[str]:
    """The held-out test set on which a run grades generations before and after training: ``n`` distinct
    prompts from their own seed stream, as many of each length as the task has (it draws the length
    uniformly), none of them a prompt of the bundled pairs (trained on or held out for preference
    accuracy) or an SFT dev prompt. The same for every run and seed, and never used to choose a setting.
    (Drawing distinct unseen prompts without fixing the lengths would under-represent 3 digits: there
    are only 990 such prompts, and the pairs hold a third of them.)"""
    seen = set(pair_prompts(PairSettings())) | set(dev_prompts(SFTSettings.seed, SFTSettings.dev_prompts))
    return held_out_prompts(n, seen, LENGTHS)


def held_out_prompts(n: int, seen: set[str], lengths: tuple[int, int]) -> list[str]:
    """``n`` distinct prompts not in ``seen``, from the test seed stream, as many of each length in
    ``lengths`` as can be (the first lengths get one fewer when they do not divide ``n``), shuffled."""
    ks = range(lengths[0], lengths[1] + 1)
    rng = random.Random("test/0")
    out = []
    for i, k in enumerate(ks):
        out += distinct_prompts(rng, (n * (i + 1)) // len(ks) - (n * i) // len(ks), seen, k)
    random.Random("test/order").shuffle(out)  # so that the first samples shown are of every length
    return out


# The demo's presets for a run on its model (no --model_name_or_path): sized for a 2-core CPU and chosen on
# seed-1 runs before the test prompts existed. The tiny model forgets how to write under the preference loss
# alone, hence the large SFT weight (docs/results.md).
PRESETS = {
    "learning_rate": 5e-4,
    "per_device_train_batch_size": 16,
    "max_length": 64,
    "max_steps": 300,
    "save_steps": 50,
    "eval_size": 128,
    "logging_steps": 5,
    "eval_steps": 0,
    "sft_weight": 1.0,
}


# Over PRESETS for `--algorithm grpo`: 8 prompts x 8 completions a step, 100 steps (about 10 minutes on a
# 2-core CPU); the learning rate is the one of three seed-42 trials (1e-4; 2e-4 with --kl_beta 0.04, with and
# without --num_iterations 2; 1e-3 and 5e-4 lowered the training reward) whose test accuracy was highest, so
# these figures are not clean of the test set (benchmarks/results/grpo_demo.md). --sft_weight is VRPO's.
ONLINE_PRESETS = {
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 8,
    "max_steps": 100,
    "save_steps": 50,
    "logging_steps": 5,
}


def answer_tokens(tokenizer, prompt: str) -> int:
    """Tokens of the right answer's response (its characters, end-of-turn and EOS): the length the task's
    sampler generates, which a wrong answer of the same digits also has."""
    return sum(encode_example(tokenizer, prompt, reference_answer(prompt))["response_mask"])


@dataclass(frozen=True)
class SortTask:
    """The sorting demo as a :class:`vrpo.training.GradedTask`."""

    name: str = "sorting"
    presets: Mapping[str, object] = field(default_factory=lambda: dict(PRESETS))
    online_presets: Mapping[str, object] = field(default_factory=lambda: dict(ONLINE_PRESETS))

    def model_path(self) -> str:
        return sft_path()

    def tokenizer(self):
        return task_tokenizer()

    def pairs_path(self) -> str:
        return pairs_path()

    def test_prompts(self) -> list[str]:
        return test_prompts()

    def dev_prompts(self) -> list[str]:
        """The SFT command's 256 dev prompts (never a test prompt; some are prompts of the pairs)."""
        return dev_prompts(SFTSettings.seed, SFTSettings.dev_prompts)

    def evaluate(self, model, tokenizer, prompts: Sequence[str]) -> GenerationReport:
        return evaluate_generations(model, tokenizer, prompts)

    def reward(self, prompt: str, answer: str) -> float:
        """The partial credit (:func:`grade`): 1 exactly when the answer is the right sort."""
        return grade(prompt, answer).credit

    def answer_length(self, tokenizer, prompt: str) -> int:
        return answer_tokens(tokenizer, prompt)

    def describe(self, sample: dict) -> str:
        return describe_sample(sample)


SORT_TASK = SortTask()


# --------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairSettings:
    """``python -m vrpo.tasks.sort pairs``: ``samples`` answers per prompt from the SFT model at
    ``temperature``, paired by :func:`rank_pair` (a right answer against the nearest wrong one)."""

    prompts: int = 1500
    samples: int = 8
    temperature: float = 1.0
    seed: int = 0


def pair_prompts(settings: PairSettings, lengths: tuple[int, int] = LENGTHS) -> list[str]:
    """Distinct prompts, from the pairs' own seed stream."""
    rng = random.Random(f"pairs/{settings.seed}")
    return distinct_prompts(rng, settings.prompts, seen=set(), lengths=lengths)
