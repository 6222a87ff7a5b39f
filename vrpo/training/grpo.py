"""``GRPOTrainer``: online RL (``--algorithm grpo``) on the ELBO-based loop
(:class:`~vrpo.training.trainer.ELBOTrainer`: building, the step with its accumulation, clipping and non-finite
checks, the loop, evaluation, checkpoints, outputs), with VRPO's estimator and kernels. Its micro-batch loss:

1. every ``--num_iterations`` optimizer steps, a new batch of prompts (the training pairs' prompts, in the
   run's seeded order: :class:`.schedule.Schedule`); for each, ``--num_generations`` completions from the
   current policy (:mod:`.rollouts`), rewarded by the task's verifier or ``--reward_fn``, with group-relative
   advantages (:func:`vrpo.estimator.group_advantages`: another advantage estimator, RLOO say, is an option
   of that function, not another trainer); the batch is kept in a :class:`.rollouts.RolloutBuffer`;
2. masks for every completion keyed by ``(seed, epoch, prompt, completion)``, the same at every iteration;
   with ``num_iterations > 1`` the rollout policy's ELBO terms on them are stored with the rollouts;
3. the clipped ELBO-ratio loss (:func:`vrpo.estimator.grpo_loss`: current and rollout policy, and the
   reference when ``--kl_beta > 0``, on the same masks; independent ones under ``--no_antithetic``; d1's
   one-step estimate instead of the ELBO under ``--likelihood one_step``, for ablations).

Resuming at a step that is not the first of a rollout batch (``num_iterations > 1``) samples that batch again
from the restored weights, which are not the ones it was first sampled from: such a run is not bit for bit the
uninterrupted one (a warning says so).
"""

from __future__ import annotations

import logging

import torch

from ..estimator import NoisyDraw, draw_key, group_advantages, grpo_loss, noisy_draw, one_step_draw
from . import distributed, rollouts
from .batches import batch_terms
from .config import GRPOConfig
from .rollouts import RolloutBatch, RolloutBuffer
from .schedule import Item
from .task import GradedTask
from .trainer import ELBOTrainer, grouped

logger = logging.getLogger("vrpo")


class GRPOTrainer(ELBOTrainer):
    """Train a masked diffusion LM with GRPO on ELBO ratios (see the module docstring).

    Args:
        as :class:`~vrpo.training.trainer.ELBOTrainer`, with a :class:`~vrpo.training.config.GRPOConfig`, plus
        prompts: the prompt (text or messages, what the reward function receives) of each training pair;
            default: read back from the run's data file.
    """

    CONFIG = GRPOConfig
    NAME = "GRPO"
    LOSS_METRIC = "loss/grpo"
    PROGRESS = {"loss": (LOSS_METRIC, ".4f"), "reward": ("reward", ".3f")}

    def __init__(
        self,
        config: GRPOConfig,
        model=None,
        ref_model=None,
        tokenizer=None,
        train_pairs=None,
        eval_pairs=None,
        task: GradedTask | None = None,
        callbacks=(),
        prompts: list | None = None,
    ):
        super().__init__(config, model, ref_model, tokenizer, train_pairs, eval_pairs, task, callbacks)
        try:
            self._prepare_rollouts(prompts)
        except BaseException:
            self.close()
            raise

    def _prepare_rollouts(self, prompts: list | None):
        cfg = self.config
        if cfg.reward_fn is None and self.task is None:
            raise ValueError(
                "--algorithm grpo on --dataset needs --reward_fn module:function (a user's data has no verifier)"
            )
        self.reward_fn = rollouts.load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        path = (cfg.dataset or self.task.pairs_path()) if prompts is None else None
        self.prompts = (
            prompts if prompts is not None else rollouts.pair_prompts(path, self.train_pairs, cfg.on_bad_rows)
        )
        if len(self.prompts) != len(self.train_pairs):
            raise ValueError(f"prompts: {len(self.prompts)} for {len(self.train_pairs)} training pairs")
        self.eos, self.answer_ends = rollouts.stop_token_ids(self.tokenizer)
        self.rollout_settings = rollouts.RolloutSettings(
            cfg.num_generations, cfg.temperature, cfg.gen_steps, cfg.block_length
        )
        self.rollouts = RolloutBuffer(cfg.num_iterations, self.rollout)
        if self.start_step % cfg.num_iterations and self.is_main:
            logger.warning(
                "resuming at step %d, inside a batch of rollouts (--num_iterations %d): the batch is "
                "sampled again from the restored weights, so this run is not bit for bit the "
                "uninterrupted one",
                self.start_step,
                cfg.num_iterations,
            )

    def task_presets(self, task: GradedTask):
        return {**task.presets, **task.online_presets}

    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch * self.config.num_iterations

    def micro_batches(self, step: int) -> list[list[Item]]:
        """The micro-batches of prompts of ``step``'s rollout batch (new every ``num_iterations`` steps)."""
        return self.schedule.micro_batches(step // self.config.num_iterations)

    # --- rollouts -------------------------------------------------------------------------------

    def answer_length(self, i: int) -> int:
        """Tokens generated for pair ``i``'s prompt: --gen_length, else the task's, else the default."""
        cfg = self.config
        if cfg.gen_length is not None:
            return cfg.gen_length
        length = self.task.answer_length(self.tokenizer, self.prompts[i]) if self.task is not None else None
        return length or rollouts.DEFAULT_GEN_LENGTH

    def rewards(self, prompts: list, answers: list[str]) -> list[float]:
        if self.reward_fn is not None:
            return rollouts.checked_rewards(
                self.reward_fn(prompts, answers), len(answers), f"--reward_fn {self.config.reward_fn}"
            )
        return rollouts.checked_rewards(
            [self.task.reward(p, a) for p, a in zip(prompts, answers)],
            len(answers),
            f"the {self.task.name} task's reward",
        )

    def completion_keys(self, items: list[Item], stream: str) -> list[int]:
        G = self.config.num_generations
        return [draw_key(self.config.seed, stream, e, i, g) for e, i in items for g in range(G)]

    def sample(self, model, items: list[Item], prompt_ids: list[list[int]]) -> list[torch.Tensor]:
        """int64 [G, T_p] completions of each prompt, in ``items``' order; prompts of one (prompt, answer)
        length are sampled in one batch, keyed by their items."""
        cfg, G = self.config, self.config.num_generations
        by_shape: dict[tuple[int, int], list[int]] = {}
        for k, (ids, (_, i)) in enumerate(zip(prompt_ids, items)):
            by_shape.setdefault((len(ids), self.answer_length(i)), []).append(k)
        out: list[torch.Tensor | None] = [None] * len(items)
        for (_, length), ks in sorted(by_shape.items()):
            key = draw_key(cfg.seed, "rollout", *(x for k in ks for x in items[k]))
            rows = rollouts.sample_groups(
                model,
                self.family.sampler,
                [prompt_ids[k] for k in ks],
                length,
                self.mask_token_id,
                self.rollout_settings,
                key,
            )
            for j, k in enumerate(ks):
                out[k] = rows[j * G : (j + 1) * G]
        return out

    def draw(self, batch: dict, keys: list[int]) -> NoisyDraw:
        """The run's noisy inputs [B, n, L] for completions, one key each, made on the device (the one place
        GRPO draws masks); with ``--likelihood one_step``, d1's one noisy copy per completion instead."""
        if self.config.likelihood == "one_step":
            return one_step_draw(
                batch["input_ids"], batch["response_mask"], batch["attention_mask"], keys, self.batches.mask_token_id
            )
        keys = torch.tensor(keys, dtype=torch.int64, device=self.batches.device)
        return noisy_draw(
            batch["input_ids"], batch["response_mask"], self.plan, keys, self.batches.mask_token_id, self.batches.impl
        )

    def rollout(self, items: list[Item]) -> RolloutBatch:
        """Sample, cut, reward and (``num_iterations > 1``) score the completions of ``items``' prompts."""
        cfg, G = self.config, self.config.num_generations
        prompt_ids = [rollouts.pair_prompt_ids(self.train_pairs, i) for _, i in items]
        acc = self.accelerator
        # Each process samples its own prompts, whose lengths set the sampler's steps: no collective inside.
        with distributed.fully_gathered(acc, self.policy_elbo):
            model = self.policy_model
            was_training = model.training
            model.eval()
            with acc.autocast():
                completions = self.sample(model, items, prompt_ids)
            model.train(was_training)
        responses = [rollouts.cut_completion(row, self.eos) for c in completions for row in c.tolist()]
        answers = [rollouts.decode_answer(self.tokenizer, r, self.answer_ends) for r in responses]
        texts = [self.prompts[i] for _, i in items for _ in range(G)]
        rewards = torch.tensor(self.rewards(texts, answers), dtype=torch.float32).view(len(items), G)
        advantages, zero_std = group_advantages(rewards, cfg.scale_rewards)
        batch = rollouts.completion_batch(
            [p for p in prompt_ids for _ in range(G)], responses, self.batches.pad_id, acc.device
        )
        keys = self.completion_keys(items, "grpo")
        old = None
        if cfg.num_iterations > 1:
            old_keys = keys if self.plan.antithetic else self.completion_keys(items, "grpo_old")
            with torch.no_grad(), acc.autocast():
                old_draw = self.draw(batch, old_keys)
                old = grouped(batch_terms(self.policy_elbo, batch, old_draw), old_draw.plan)
        return RolloutBatch(
            batch,
            keys,
            rewards.to(acc.device),
            advantages.flatten().to(acc.device),
            zero_std,
            None if old is None else old.detach().clone(),
        )

    # --- the loss -------------------------------------------------------------------------------

    def loss_on(self, items: list[Item], step: int):
        """(loss, metrics, tokens through the models) of one micro-batch of prompts of optimizer step ``step``."""
        cfg = self.config
        r = self.rollouts.get(step, items)
        draw = self.draw(r.batch, r.keys)
        new = grouped(batch_terms(self.policy_elbo, r.batch, draw), draw.plan)  # d1's draw: one sample, [B, 1]
        old = r.old_terms if r.old_terms is not None else new.detach()
        ref, ref_ran = None, False
        if cfg.kl_beta > 0:
            ref_keys = r.keys if self.plan.antithetic else self.completion_keys(items, "grpo_ref")
            ref_draw = draw if ref_keys is r.keys else self.draw(r.batch, ref_keys)
            ref_terms, ref_ran = self.reference.terms(r.batch, items, ref_draw)
            ref = grouped(ref_terms, ref_draw.plan)
        loss, metrics = grpo_loss(new, old, r.advantages, cfg.epsilon, ref, cfg.kl_beta)
        lengths = r.batch["response_mask"].sum(-1).float()
        metrics.update(
            {
                "loss/grpo": loss.detach(),
                "reward": r.rewards.mean(),
                "reward_std": r.rewards.std(-1).mean(),
                "frac_reward_zero_std": r.zero_std.float().mean(),
                "completions/mean_length": lengths.mean(),
            }
        )
        # Tokens through the models in the loss (the rollouts' sampling and scoring are not counted).
        samples = draw.n  # n_t * n_yt, or 1 for d1's estimate
        tokens = int(r.batch["attention_mask"].sum()) * samples * (2 if ref_ran else 1)
        return loss, metrics, tokens
