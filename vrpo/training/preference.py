"""``VRPOTrainer``: offline preference optimisation (``--algorithm vrpo``, and ``naive_dpo`` for comparison) on
the ELBO-based loop (:class:`~vrpo.training.trainer.ELBOTrainer`).

One micro-batch of pairs (``loss_on``):

1. the chosen then rejected sequences of the pairs (:class:`.batches.Batches`), and their noisy inputs made on
   the device, keyed by ``(seed, epoch, pair, side)`` (Philox, :func:`~vrpo.estimator.noisy_draw`), so a draw
   never depends on batching, padding, process count or resumption;
2. the policy on its draws (with gradients) and the reference on the same draws (antithetic sampling) or
   fresh ones, without gradients (:class:`.reference.Reference`); chosen and rejected go through in one batch;
3. the VRPO loss (LLaDA 1.5, Eq. 7 on ELBO estimates) plus the masked-diffusion SFT term.

With ``--precompute_ref`` the reference's terms of every pair the run will see are computed before the first
step, and the reference model is freed.
"""

from __future__ import annotations

from ..estimator import mdm_sft_loss, vrpo_loss
from . import advisor_tally
from .batches import batch_terms
from .config import VRPOConfig
from .schedule import Item
from .trainer import ELBOTrainer, grouped


class VRPOTrainer(ELBOTrainer):
    """Train a masked diffusion LM with VRPO (or naive DPO) on preference pairs.

    Args: as :class:`~vrpo.training.trainer.ELBOTrainer`, with a :class:`~vrpo.training.config.VRPOConfig`.
    """

    CONFIG = VRPOConfig
    NAME = "VRPO"
    LOSS_METRIC = "loss/vrpo"
    PROGRESS = {"loss": (LOSS_METRIC, ".4f"), "acc": ("rewards/accuracies", ".2f")}

    def before_loop(self):
        """With ``--precompute_ref``: the reference's terms for every (epoch, pair) this process will train on,
        then free the reference."""
        if not self.config.precompute_ref:
            return
        steps = range(self.start_step, self.max_steps)
        todo = sorted({it for step in steps for it in self.schedule.step_pairs(step)})

        def batch_and_draw(items):
            batch = self.batches.of(self.train_pairs, items)
            return batch, self.batches.draws(batch, items, self.plan)[1]

        self.reference.precompute(todo, self.config.per_device_train_batch_size, batch_and_draw, self.is_main)

    def loss_on(self, items: list[Item], step: int):
        """(loss, metrics, tokens through the models) of one micro-batch of pairs."""
        cfg = self.config
        batch = self.batches.of(self.train_pairs, items)
        draw, ref_draw = self.batches.draws(batch, items, self.plan)
        policy_terms = batch_terms(self.policy_elbo, batch, draw)
        ref_terms, ref_ran = self.reference.terms(batch, items, ref_draw)
        B = len(items)
        pc, pr = grouped(policy_terms[:B], self.plan), grouped(policy_terms[B:], self.plan)
        rc, rr = grouped(ref_terms[:B], self.plan), grouped(ref_terms[B:], self.plan)
        loss, metrics = vrpo_loss(
            pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing
        )
        metrics["loss/vrpo"] = loss.detach()
        metrics.update(advisor_tally.step_variances(pc, pr, rc, rr, cfg.beta))  # the advisor's two parts; metrics only
        if cfg.pref_weight != 1.0:  # only then: the default's loss stays bit for bit
            loss = cfg.pref_weight * loss
        if cfg.sft_weight > 0:
            sft = mdm_sft_loss(pc, batch["response_mask"][:B].sum(-1))
            metrics["loss/sft"] = sft.detach()
            loss = loss + cfg.sft_weight * sft
        # Tokens through the models: n masked copies of every real token, for the policy and the reference.
        tokens = int(batch["attention_mask"].sum()) * self.plan.n * (2 if ref_ran else 1)
        return loss, metrics, tokens
