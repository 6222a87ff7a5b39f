"""Rollouts for online RL: a group of completions per prompt from the current policy, cut at their stop token,
decoded and rewarded.

A prompt is a training pair's prompt (its tokens are the ones the pair was tokenized with, chat template
included); its completions come from the sampler of the model's family. The prompts of a micro-batch with the
same prompt and answer lengths are sampled in one batch (no padding), from a generator keyed by their items:
a rollout is a function of the seed, the step's prompts and the weights, not of resumption. A completion's response
is its tokens up to
and including the first EOS (the tokens after it are padding: no attention, never masked, never scored), as
in TRL's and d1's GRPO.

:class:`RolloutBuffer` holds the rollouts of the current batch of prompts, made once and reused for
``--num_iterations`` optimizer steps.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..models import collate
from ..models.families import token_id
from ..models.samplers import SAMPLERS
from ..models.tokenization import tokenizer_family
from .data import TokenizedPairs, read_preference_rows
from .schedule import CHOSEN, Item

DEFAULT_GEN_LENGTH = 128  # --gen_length's default where the task does not know an answer's length


def pair_prompt_ids(pairs: TokenizedPairs, i: int) -> list[int]:
    """The prompt tokens of pair ``i``: its chosen sequence up to the first response token."""
    seq = pairs.sequence(i, CHOSEN)
    first = int(seq["response_mask"].argmax())
    return [int(t) for t in seq["input_ids"][:first]]


def pair_prompts(path: str, pairs: TokenizedPairs, on_bad_rows: str = "error") -> list:
    """The prompt (text or messages) of each pair of ``pairs``, read back from ``path`` by the pair's source
    (file:line). ``ValueError`` naming ``path`` when a pair did not come from it."""
    by_source = {row["source"]: row["prompt"] for row in read_preference_rows(path, on_bad_rows=on_bad_rows)}
    missing = [s for s in pairs.sources if s not in by_source]
    if missing:
        raise ValueError(f"{path}: no row for the pairs from {missing[:3]}: pass the prompts with prompts=")
    return [by_source[s] for s in pairs.sources]


def stop_token_ids(tokenizer) -> tuple[int, list[int]]:
    """``(eos, answer_ends)``: the EOS that ends a completion's response, and the ids that end its answer
    text (the family's end-of-turn and EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: rollouts need one to end a completion")
    eot = token_id(tokenizer, tokenizer_family(tokenizer).end_of_turn)
    return int(eos), [int(eos)] + ([eot] if eot is not None else [])


def cut_completion(ids: Sequence[int], eos: int) -> list[int]:
    """A completion's response: its tokens through the first ``eos`` (all of them when there is none)."""
    ids = list(ids)
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def decode_answer(tokenizer, response: Sequence[int], answer_ends: Sequence[int]) -> str:
    """The answer text: the response's tokens before the first of ``answer_ends``, special tokens dropped."""
    ends = [i for i, t in enumerate(response) if t in answer_ends]
    return tokenizer.decode(list(response[: ends[0] if ends else len(response)]), skip_special_tokens=True).strip()


@dataclass(frozen=True)
class RolloutSettings:
    """How completions are sampled: the family's sampler with these settings (``None``: one step per token,
    one block)."""

    num_generations: int
    temperature: float
    steps: int | None
    block_length: int | None


@torch.no_grad()
def sample_groups(
    model,
    sampler: str,
    prompts: Sequence[Sequence[int]],
    length: int,
    mask_token_id: int,
    settings: RolloutSettings,
    key: int,
) -> torch.Tensor:
    """int64 [P * G, length]: ``G`` completions of each of ``P`` prompts of one token length (prompt-major),
    in one batch, from the family's ``sampler`` (a key of :data:`vrpo.models.SAMPLERS`) with a generator
    seeded by ``key``. The prompts are not returned."""
    device = next(model.parameters()).device
    G = settings.num_generations
    prompt_ids = torch.tensor([list(p) for p in prompts for _ in range(G)], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(key)
    out = SAMPLERS[sampler](
        model,
        prompt_ids,
        mask_token_id,
        gen_length=length,
        steps=settings.steps or length,
        block_length=settings.block_length or length,
        temperature=settings.temperature,
        generator=g,
    )
    P = prompt_ids.shape[1]
    if not torch.equal(out[:, :P], prompt_ids):
        raise RuntimeError("the sampler changed the prompt")  # would score a sequence nobody sampled
    return out[:, P:]


def completion_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device
) -> dict[str, torch.Tensor]:
    """``[prompt, response]`` rows, right-padded (:func:`vrpo.models.collate`): ``input_ids``,
    ``response_mask`` (the response only), ``attention_mask`` (0 on padding) [B, L]."""
    rows = [
        {"input_ids": list(p) + list(c), "response_mask": [False] * len(p) + [True] * len(c)}
        for p, c in zip(prompts, completions)
    ]
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


RewardFn = Callable[[list, list[str]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """``module:function`` -> the function (imported by name: a user's module, not vrpo's)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward_fn {spec}: cannot import {module_name} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec}: {module_name} has no function {name}")
    return fn


def checked_rewards(values, n: int, what: str) -> list[float]:
    """``values`` as ``n`` finite floats, else ``ValueError`` naming ``what``."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} returned {len(values)} rewards for {n} completions")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{what} returned {v!r}: rewards must be finite numbers")
        out.append(float(v))
    return out


@dataclass(frozen=True)
class RolloutBatch:
    """The completions of a micro-batch of prompts, ready to score.

    Attributes:
        batch: ``input_ids``, ``response_mask``, ``attention_mask`` [P * G, L] (prompt-major).
        keys: the P * G draw keys of the completions' masks.
        rewards: float32 [P, G].
        advantages: float32 [P * G].
        zero_std: bool [P], groups whose rewards are all equal.
        old_terms: float32 [P * G, n_t], the rollout policy's terms on the keyed masks (None when the rollout
            policy is the current one, ``num_iterations = 1``).
    """

    batch: dict
    keys: list[int]
    rewards: torch.Tensor
    advantages: torch.Tensor
    zero_std: torch.Tensor
    old_terms: torch.Tensor | None


class RolloutBuffer:
    """The rollouts of one batch of prompts (a *cycle*: ``num_iterations`` optimizer steps), by micro-batch.

    Args:
        num_iterations: optimizer steps per batch of rollouts.
        make: ``make(items) -> RolloutBatch``, called once per micro-batch of a cycle, the first time it is
            asked for (so a run resumed inside a cycle samples its batch again).
    """

    def __init__(self, num_iterations: int, make: Callable[[list[Item]], RolloutBatch]):
        self.num_iterations = num_iterations
        self.make = make
        self.cycle: int | None = None
        self.batches: dict[tuple[Item, ...], RolloutBatch] = {}

    def get(self, step: int, items: list[Item]) -> RolloutBatch:
        """The rollouts of ``items``' prompts for optimizer step ``step`` (those of an earlier cycle are
        dropped)."""
        cycle = step // self.num_iterations
        if cycle != self.cycle:
            self.cycle, self.batches = cycle, {}
        key = tuple(items)
        if key not in self.batches:
            self.batches[key] = self.make(items)
        return self.batches[key]
