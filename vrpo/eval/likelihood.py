"""Monte Carlo log-likelihoods for evaluation: the ELBO of each continuation given its context, with a
standard error, common random numbers across the choices of one context, and an adaptive budget.

Pure tensor maths: the model enters only through ``terms_fn`` (the per-sample ELBO terms of a batch,
:func:`vrpo.estimator.packed_elbo_terms` in the harness model), so every rule here is tested with small stand-ins.

**The estimator** (``scheme="crn"``). For a continuation of ``L`` tokens, one sample draws a level
``l ~ U{1..L}``, masks ``l`` continuation tokens uniformly at random and scores them:
``term = (L / l) * sum_{masked} log p(y_i | masked sequence)`` (the l-uniform estimator, LLaDA 1.5,
Zhu et al. 2025, Sec. 2, Eq. 2, with ``t`` integrated out). The mean over samples is an unbiased
estimate of the ELBO, a lower bound of ``log p(continuation | context)``. Levels are stratified per round:
sample ``j`` of a round of ``R`` uses the quantile ``u_j = (j + offset) / R`` and ``l_j = floor(u_j L) + 1``.

**Common random numbers.** Multiple choice compares continuations of one context: what decides the
answer is the *difference* of their estimates. Every continuation of a context gets the same quantiles
``u_j`` (so sample ``j`` masks the same fraction of each) and, where two continuations have the same length,
the same masked positions. Positively correlated estimates have a difference of lower variance: this is
VRPO's antithetic sampling (LLaDA 1.5, Sec. 3.2: the policy and reference share their draws) applied to
the choices of a question.

**Adaptive budget.** Samples come in rounds of ``mc_round`` per continuation until the standard error of
the gap between the best and the second-best continuation (per-sample differences, paired by CRN) is
below ``mc_target_se`` or ``mc_max`` samples are reached; a context with one continuation stops on the
standard error of its own estimate. ``mc_num`` fixes the budget instead. Stopping on the data makes the
adaptive mean very slightly biased (optional stopping); a fixed budget is exactly unbiased.

**LLaDA's scheme** (``scheme="llada"``, its ``eval_llada.py``): each continuation on its own; per
mini-batch of ``mc_batch`` samples one ``k ~ U{1..L}`` and the evenly spaced counts
``round(k + i L / mc_batch)`` wrapped into ``1..L``, an independent random permutation per sample, weight
``L / l``; ``mc_num`` samples (default 128).

Every draw is seeded from ``(seed, group, round, ...)`` (:func:`vrpo.estimator.draw_key`), so an estimate does
not depend on the batch, the order of requests or the process it lands in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..estimator import draw_key

SCHEMES = ("crn", "llada")

# terms_fn(input_ids int64 [B, S], response_mask bool [B, S], masked bool [B, n, S], weight float32 [B, n])
#   -> float32 [B, n]: weight * sum of masked log p per sample (right-padded rows).
TermsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MCSettings:
    """How the harness estimates a log-likelihood (bounds beside each setting).

    Attributes:
        scheme: ``"crn"`` (this library's: stratified l-uniform levels, common random numbers, adaptive
            or fixed budget) or ``"llada"`` (LLaDA's eval_llada.py).
        mc_num: fixed samples per continuation (>= 2); None: adaptive (``crn``) or 128 (``llada``).
        mc_target_se: adaptive stop: standard error (nats) of the top-two gap, > 0.
        mc_max: adaptive cap on samples per continuation (>= mc_round).
        mc_round: samples per continuation per adaptive round (>= 2: a standard error needs two).
        mc_batch: ``llada`` only: samples per stratified mini-batch (LLaDA's ``batch_size``); divides mc_num.
        crn: share quantiles and masks across the continuations of a context (False: each draws its own;
            kept for the benchmark's ablation).
        seed: the root of every draw.
    """

    scheme: str = "crn"
    mc_num: int | None = None
    mc_target_se: float = 0.5  # chosen on dev questions: benchmarks/results/eval_mc_dev.md
    mc_max: int = 128
    mc_round: int = 8
    mc_batch: int = 32
    crn: bool = True
    seed: int = 1234

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"mc_scheme={self.scheme!r} is not one of {SCHEMES}")
        for name, low in (("mc_max", 2), ("mc_round", 2), ("mc_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.mc_num is not None and (
            isinstance(self.mc_num, bool) or not isinstance(self.mc_num, int) or self.mc_num < 2
        ):
            raise ValueError(
                f"mc_num must be an integer >= 2 (a standard error needs two samples), got {self.mc_num!r}"
            )
        if not (isinstance(self.mc_target_se, (int, float)) and self.mc_target_se > 0):
            raise ValueError(f"mc_target_se must be a positive number of nats, got {self.mc_target_se!r}")
        if self.mc_max < self.mc_round:
            raise ValueError(f"mc_max={self.mc_max} must be at least mc_round={self.mc_round}")
        if self.scheme == "llada" and self.budget % self.mc_batch:
            raise ValueError(f"mc_scheme=llada: mc_num={self.budget} must be a multiple of mc_batch={self.mc_batch}")

    @property
    def adaptive(self) -> bool:
        return self.scheme == "crn" and self.mc_num is None

    @property
    def budget(self) -> int:
        """Samples per continuation when the budget is fixed (``llada`` defaults to 128, as LLaDA's)."""
        return self.mc_num if self.mc_num is not None else (128 if self.scheme == "llada" else self.mc_max)

    @property
    def round_size(self) -> int:
        """Samples per continuation drawn in one round."""
        if self.scheme == "llada":
            return self.mc_batch
        return self.mc_round if self.adaptive else self.budget


@dataclass(frozen=True)
class LikelihoodRequest:
    """One continuation to score: token ids of the context (>= 1) and of the continuation (>= 1).
    ``group`` names the context: requests of one group share their random numbers (CRN)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    group: str


@dataclass(frozen=True)
class Estimate:
    """An ELBO estimate: ``mean`` (nats), its standard error ``se`` and the number of samples ``n``."""

    mean: float
    se: float
    n: int


@dataclass
class _Group:
    """The distinct continuations of one context and their per-sample terms so far (paired by index)."""

    key: str
    members: list[LikelihoodRequest]
    terms: list[list[torch.Tensor]]
    rounds: int = 0
    done: bool = False

    @property
    def n(self) -> int:
        return sum(t.numel() for t in self.terms[0])

    def samples(self, i: int) -> torch.Tensor:
        return torch.cat(self.terms[i]).double()


def standard_error(samples: torch.Tensor) -> float:
    """Standard error of the mean of ``samples`` (float [n], n >= 2): sample std / sqrt(n). Within a
    stratified round this overstates the error a little (stratification removes between-strata variance)."""
    return float(samples.std() / math.sqrt(samples.numel()))


def gap_se(group: _Group) -> float:
    """The adaptive rule's statistic: the standard error of the gap between the two continuations with the
    highest means (paired per-sample differences), or of the estimate itself for a lone continuation."""
    samples = [group.samples(i) for i in range(len(group.members))]
    if len(samples) == 1:
        return standard_error(samples[0])
    means = torch.stack([s.mean() for s in samples])
    first, second = means.topk(2).indices.tolist()
    return standard_error(samples[first] - samples[second])


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(draw_key(*parts))


def _ranked(keys: torch.Tensor) -> torch.Tensor:
    """int64 [R, L]: the rank of each key in its row (a uniformly random permutation for i.i.d. keys)."""
    return keys.argsort(-1).argsort(-1)


def crn_draw(settings: MCSettings, group: str, member: int, round_no: int, length: int, size: int):
    """``(masked bool [size, length], weight float32 [size])`` for one continuation and round, CRN scheme.

    The quantiles depend on ``(seed, group, round)`` only and the mask order on ``(..., length)``, so the
    continuations of a group share both (``member`` enters only when ``settings.crn`` is off)."""
    tag = (settings.seed, group, round_no) if settings.crn else (settings.seed, group, round_no, "member", member)
    offset = torch.rand((), generator=_generator(*tag, "levels"), dtype=torch.float64)
    u = (torch.arange(size, dtype=torch.float64) + offset) / size
    levels = torch.clamp(torch.floor(u * length) + 1, max=length).long()
    keys = torch.rand((size, length), generator=_generator(*tag, "order", length), dtype=torch.float64)
    masked = _ranked(keys) < levels[:, None]
    return masked, (length / levels).float()


def llada_draw(settings: MCSettings, group: str, member: int, round_no: int, length: int, size: int):
    """LLaDA's mini-batch (eval_llada.py ``_forward_process``): one ``k ~ U{1..L}``, counts
    ``round(linspace(k, k + (b - 1) L / b, b))`` wrapped into ``1..L``, an independent permutation each."""
    g = _generator(settings.seed, group, member, round_no, "llada")
    k = int(torch.randint(1, length + 1, (), generator=g))
    counts = torch.round(torch.linspace(float(k), k + (size - 1) * (length / size), size, dtype=torch.float64))
    counts = ((counts.long() - 1) % length) + 1
    masked = _ranked(torch.rand((size, length), generator=g, dtype=torch.float64)) < counts[:, None]
    return masked, (length / counts).float()


def _group_requests(requests: Sequence[LikelihoodRequest]) -> tuple[list[_Group], list[tuple[int, int]]]:
    """Distinct requests per group, and where each input request landed ``(group index, member index)``."""
    groups: dict[str, _Group] = {}
    index: dict[str, int] = {}
    member: dict[LikelihoodRequest, int] = {}
    where = []
    for req in requests:
        if not req.context or not req.continuation:
            raise ValueError("a likelihood request needs a non-empty context and a non-empty continuation")
        g = groups.setdefault(req.group, _Group(req.group, [], []))
        index.setdefault(req.group, len(index))
        if req not in member:
            member[req] = len(g.members)
            g.members.append(req)
            g.terms.append([])
        where.append((index[req.group], member[req]))
    return list(groups.values()), where


class LikelihoodEstimator:
    """Estimates the ELBO of many requests, packed across requests into few ``terms_fn`` calls.

    Args:
        terms_fn: the model (see :data:`TermsFn`).
        settings: the :class:`MCSettings`.
        max_sequences: masked sequences per ``terms_fn`` call (the harness's batch size times the round).

    Attributes:
        sequences: masked sequences scored so far (forward passes of one sequence, as LLaDA counts them).
        calls: ``terms_fn`` calls so far.
    """

    def __init__(self, terms_fn: TermsFn, settings: MCSettings, max_sequences: int = 256):
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        self.terms_fn = terms_fn
        self.settings = settings
        self.max_sequences = max_sequences
        self.sequences = 0
        self.calls = 0

    def estimate(self, requests: Sequence[LikelihoodRequest]) -> list[Estimate]:
        """One :class:`Estimate` per request, in order (duplicates are scored once)."""
        groups, where = _group_requests(requests)
        while True:
            active = [g for g in groups if not g.done]
            if not active:
                break
            self._run_round(active)
            for g in active:
                g.rounds += 1
                g.done = self._stops(g)
        out = []
        for gi, mi in where:
            s = groups[gi].samples(mi)
            out.append(Estimate(float(s.mean()), standard_error(s), s.numel()))
        return out

    def _stops(self, g: _Group) -> bool:
        s = self.settings
        if not s.adaptive:
            return g.n >= s.budget
        return g.n >= s.mc_max or gap_se(g) < s.mc_target_se

    def _run_round(self, groups: list[_Group]):
        draw = llada_draw if self.settings.scheme == "llada" else crn_draw
        size = self.settings.round_size
        if self.settings.adaptive:  # active groups have all drawn the same rounds: one size fits all
            size = min(size, self.settings.mc_max - groups[0].n)
        items = []  # (group, member index, request, masked [size, L], weight [size])
        for g in groups:
            for i, req in enumerate(g.members):
                masked, weight = draw(self.settings, g.key, i, g.rounds, len(req.continuation), size)
                items.append((g, i, req, masked, weight))
        per_call = max(1, self.max_sequences // size)
        for start in range(0, len(items), per_call):
            chunk = items[start : start + per_call]
            terms = self._score(chunk, size)
            for (g, i, *_), t in zip(chunk, terms):
                g.terms[i].append(t.detach().double().cpu())

    def _score(self, chunk, size: int) -> torch.Tensor:
        """float32 [len(chunk), size]: one ``terms_fn`` call for a chunk of right-padded rows."""
        S = max(len(req.context) + len(req.continuation) for _, _, req, _, _ in chunk)
        B = len(chunk)
        ids = torch.zeros(B, S, dtype=torch.long)
        resp = torch.zeros(B, S, dtype=torch.bool)
        masked = torch.zeros(B, size, S, dtype=torch.bool)
        weight = torch.stack([w for *_, w in chunk])
        for b, (_, _, req, m, _) in enumerate(chunk):
            P, L = len(req.context), len(req.continuation)
            ids[b, : P + L] = torch.tensor(req.context + req.continuation)
            resp[b, P : P + L] = True
            masked[b, :, P : P + L] = m
        self.sequences += B * size
        self.calls += 1
        return self.terms_fn(ids, resp, masked, weight)
