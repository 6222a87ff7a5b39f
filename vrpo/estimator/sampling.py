"""Sampling plans for the Monte Carlo ELBO: timesteps, masks and their weights.

A masked diffusion LM's log-likelihood is bounded below by an ELBO that is an expectation over a
noise level and a random mask of the response (LLaDA 1.5, Zhu et al. 2025, Section 2, Eq. 2). VRPO estimates it
with ``n = n_t * n_yt`` samples per response: ``n_t`` noise levels, ``n_yt`` masks per level.

Two unbiased estimators are available:

* ``"l_uniform"`` (default, what LLaDA 1.5 uses): ``l ~ U{1..L_b}``, mask exactly ``l`` of the row's
  ``L_b`` response tokens uniformly, weight ``L_b / l``. The weight is bounded by ``L_b``.
* ``"t_bernoulli"``: ``t ~ U(0, 1]``, mask each response token with probability ``t``, weight ``1/t``.
  Unbiased but with a (logarithmically) divergent second moment, because a rare tiny ``t`` carries a
  huge weight. ``t_floor=eps > 0`` uses LLaDA's ``p = (1 - eps) t + eps`` instead: the variance is
  then finite but the estimator is *biased*: it computes ``1/(1-eps) * int_eps^1 f(p) dp`` instead of
  ``int_0^1 f(p) dp`` (``f(p)`` = the expected weighted term at level p), an error of at most
  about ``2 * eps * max_p |f(p)| <= 2 * eps * L_b * max NLL``. l-uniform is the Rao-Blackwellised
  t-Bernoulli (it integrates t out given the count), hence the default.

``stratified=True`` replaces the ``n_t`` i.i.d. uniforms of a row by ``(j + u) / n_t``, ``j = 0..n_t-1``,
with one shared ``u ~ U[0, 1)``: each level is still marginally uniform, so the mean over ``j`` stays
unbiased, and the levels cover [0, 1) evenly, which lowers the variance (LLaDA's evaluation code
does the same).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace

import torch

from vrpo_kernels import sample_masks

ESTIMATORS = ("l_uniform", "t_bernoulli")


@dataclass(frozen=True)
class SamplingPlan:
    """How many ELBO samples to draw per response, and how.

    Attributes:
        n_t: noise levels (timesteps) per response. The paper's optimal allocation puts the whole
            budget here (``n_yt = 1``).
        n_yt: masks per noise level.
        estimator: ``"l_uniform"`` or ``"t_bernoulli"`` (see the module docstring).
        antithetic: the trainer feeds the same draw to the policy and the reference (the paper's
            antithetic sampling). ``draw_masks`` itself does not read it.
        stratified: stratify the ``n_t`` levels of a row (one offset, evenly spaced strata).
        t_floor: t-Bernoulli only: the floor ``eps`` of LLaDA's ``p = (1 - eps) t + eps``. 0 keeps the
            estimator unbiased.
    """

    n_t: int = 8
    n_yt: int = 1
    estimator: str = "l_uniform"
    antithetic: bool = True
    stratified: bool = False
    t_floor: float = 0.0

    def __post_init__(self):
        for name in ("n_t", "n_yt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SamplingPlan: {name} must be a positive integer, got {value!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"SamplingPlan: estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not 0.0 <= self.t_floor < 1.0:
            raise ValueError(f"SamplingPlan: t_floor must be in [0, 1), got {self.t_floor!r}")

    @property
    def n(self) -> int:
        """The budget: samples per response."""
        return self.n_t * self.n_yt

    @classmethod
    def naive(cls, estimator: str = "l_uniform") -> SamplingPlan:
        """Naive DPO on an MDM: one sample, independent draws for policy and reference."""
        return cls(n_t=1, n_yt=1, estimator=estimator, antithetic=False)

    def replace(self, **changes) -> SamplingPlan:
        return replace(self, **changes)


@dataclass(frozen=True)
class MaskDraw:
    """One draw of ``n = n_t * n_yt`` masks per row.

    Attributes:
        masked: bool [B, n, L]; True where the token is replaced by the mask token. Samples are
            ordered timestep-major: sample ``j * n_yt + k`` is mask ``k`` of level ``j``.
        weight: float32 [B, n]; the estimator weight of each sample (``L_b / l`` or ``1 / t``).
        levels: float32 [B, n_t]; the drawn ``l`` (as a float) or mask probability ``p`` per level.
        plan: the plan it was drawn with.
    """

    masked: torch.Tensor
    weight: torch.Tensor
    levels: torch.Tensor
    plan: SamplingPlan

    @property
    def n(self) -> int:
        return self.masked.shape[1]

    def to(self, device) -> MaskDraw:
        """The same draw (of the same class) with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B]: response tokens per row. Raises ValueError naming the first empty row."""
    if response_mask.dtype != torch.bool or response_mask.dim() != 2:
        raise ValueError(
            f"response_mask must be a bool tensor [B, L], got {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    lengths = response_mask.sum(-1)
    empty = (lengths == 0).nonzero()
    if empty.numel():
        rows = empty[:, 0].tolist()
        raise ValueError(
            f"response_mask: row {rows[0]} has no response tokens (empty rows: {rows[:10]}); "
            "every sequence needs at least one response token to estimate its ELBO"
        )
    return lengths


def draw_levels(lengths: torch.Tensor, plan: SamplingPlan, generator: torch.Generator | None = None):
    """Draw the noise levels of each row.

    Args:
        lengths: int64 [B], response tokens per row (>= 1).

    Returns:
        ``(levels, weight)``, both float32 [B, n_t]: the mask count ``l`` (l-uniform) or the mask
        probability ``p`` (t-Bernoulli), and the estimator weight of that level.
    """
    B = lengths.shape[0]
    device = lengths.device
    if plan.stratified:
        offset = torch.rand((B, 1), generator=generator, device=device)
        u = (torch.arange(plan.n_t, device=device) + offset) / plan.n_t
    else:
        u = torch.rand((B, plan.n_t), generator=generator, device=device)
    L = lengths[:, None].float()
    if plan.estimator == "l_uniform":
        # floor(u * L) + 1 is uniform on {1..L} when u is uniform on [0, 1).
        levels = torch.minimum(torch.floor(u * L) + 1, L)
        return levels, L / levels
    t = 1.0 - u  # uniform on (0, 1]
    p = (1.0 - plan.t_floor) * t + plan.t_floor
    return p, 1.0 / p


def draw_masks(
    response_mask: torch.Tensor,
    plan: SamplingPlan,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> MaskDraw:
    """Draw ``plan.n`` masks for every row of a batch.

    Args:
        response_mask: bool [B, L]; True on the response tokens that count (prompt, padding and
            padded EOS False). Every row needs at least one True.
        plan: the sampling plan.
        generator: a ``torch.Generator`` on ``response_mask``'s device; the same seed gives the same
            draw. ``None`` uses the global RNG.
        impl: the mask sampler (``vrpo_kernels.sample_masks``): ``"torch"``, ``"triton"`` (Philox in one
            kernel; its seed comes from ``generator``) or ``"auto"`` (Triton on CUDA). The two give the
            same distribution, not the same bits.

    Returns:
        A :class:`MaskDraw` with ``masked`` [B, n, L] and ``weight`` [B, n].
    """
    lengths = response_lengths(response_mask)
    levels, weight = draw_levels(lengths, plan, generator)
    per_sample = levels.repeat_interleave(plan.n_yt, dim=1)
    if plan.estimator == "l_uniform":
        masked = sample_masks(response_mask, counts=per_sample.long(), generator=generator, impl=impl)
    else:
        masked = sample_masks(response_mask, probs=per_sample, generator=generator, impl=impl)
    return MaskDraw(masked, weight.repeat_interleave(plan.n_yt, dim=1), levels, plan)


def draw_key(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of parts, e.g. ``(seed, epoch, example_index, stream)``."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
