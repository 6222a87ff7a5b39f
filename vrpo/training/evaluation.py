"""Evaluation during a run: held-out preference accuracy from ELBO margins, and a task's graded generations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estimator import SamplingPlan, reward_margin
from . import distributed
from .batches import Batches, batch_terms
from .data import TokenizedPairs
from .task import GenerationReport, GradedTask


@dataclass(frozen=True)
class PreferenceEval:
    """Held-out preference accuracy under a fixed, stratified draw (the same masks at every evaluation).

    Attributes:
        accelerator: the run's (evaluation shares are balanced across processes).
        batches: how pairs become batches and draws.
        plan: the evaluation draw's plan (``--eval_n_t`` stratified levels).
        batch_size: pairs per forward.
        beta: the KL weight of the implicit reward beta * log(pi / pi_ref) (``eval/reward_margin``).
    """

    accelerator: object
    batches: Batches
    plan: SamplingPlan
    batch_size: int
    beta: float

    @classmethod
    def for_run(cls, cfg, accelerator, batches: Batches) -> PreferenceEval:
        """The evaluation of a run's config: ``--eval_n_t`` stratified levels, ``--per_device_train_batch_size``
        pairs a forward, ``--implicit_reward_beta``."""
        plan = SamplingPlan(n_t=cfg.eval_n_t, stratified=True, estimator=cfg.estimator)
        return cls(accelerator, batches, plan, max(1, cfg.per_device_train_batch_size), cfg.implicit_reward_beta)

    @torch.no_grad()
    def terms(self, elbo, pairs: TokenizedPairs) -> torch.Tensor:
        """float32 [N, 2, n] ELBO terms of every pair (chosen, rejected) under the evaluation draw."""
        acc, plan = self.accelerator, self.plan
        N = len(pairs)
        # Sharded models gather in every forward: every process runs the same number of batches.
        mine, real = distributed.balanced_share(N, acc.process_index, acc.num_processes)
        out = torch.zeros(N, 2, plan.n, device=acc.device)
        was_training = elbo.training
        elbo.eval()
        for i in range(0, len(mine), self.batch_size):
            items = [(0, j) for j in mine[i : i + self.batch_size]]
            batch = self.batches.of(pairs, items)
            draw = self.batches.draw(batch, items, plan, "eval")
            with acc.autocast():
                terms = batch_terms(elbo, batch, draw)
            B, keep = len(items), max(0, min(len(items), real - i))  # padding items are not kept
            idx = torch.tensor([j for _, j in items[:keep]], device=acc.device, dtype=torch.long)
            out[idx, 0], out[idx, 1] = terms[:B][:keep].float(), terms[B:][:keep].float()
        elbo.train(was_training)
        return acc.reduce(out, reduction="sum") if acc.num_processes > 1 else out

    def evaluate(self, elbo, pairs: TokenizedPairs, ref_terms: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """``(metrics, policy terms)``: the policy's ELBO margin > 0 (``eval/pref_acc``) and, given the
        reference's terms, the implicit reward margin > 0 (``eval/reward_acc``, ``eval/reward_margin``)."""
        policy = self.terms(elbo, pairs)
        est = policy.mean(-1)
        metrics = {"eval/pref_acc": (est[:, 0] > est[:, 1]).float().mean().item()}
        if ref_terms is not None:
            ref = ref_terms.to(est.device).mean(-1)
            margin = reward_margin(est[:, 0], est[:, 1], ref[:, 0], ref[:, 1])
            metrics["eval/reward_acc"] = (margin > 0).float().mean().item()
            metrics["eval/reward_margin"] = (self.beta * margin).mean().item()
        return metrics, policy


def check_split(task: GradedTask | None, split: str) -> None:
    """``--gen_eval_split dev`` needs a graded task with dev prompts: ``ValueError`` naming the flag otherwise."""
    if split != "dev" or callable(getattr(task, "dev_prompts", None)):
        return
    why = "this run grades no task (--dataset names its own data)" if task is None else "the task has no dev_prompts()"
    raise ValueError(f"--gen_eval_split dev grades a task's dev prompts, but {why}")


def grade_generations(
    task: GradedTask | None, accelerator, policy_elbo, tokenizer, limit: int | None = None, split: str = "test"
) -> GenerationReport | None:
    """The policy's answers to the task's test prompts (``split="dev"``: its dev prompts; the first ``limit``;
    None: all), graded by its verifier. None without a task, and on all but the main process (which, when the
    model is sharded, still take part in the forwards)."""
    is_main = accelerator.is_main_process
    if task is None or not (is_main or distributed.is_sharded(accelerator)):
        return None
    with distributed.root_gathered(accelerator, policy_elbo):  # a sharded model's forwards need every process
        model = accelerator.unwrap_model(policy_elbo).model
        prompts = task.dev_prompts() if split == "dev" else task.test_prompts()
        report = task.evaluate(model, tokenizer, prompts[:limit])
    return report if is_main else None
