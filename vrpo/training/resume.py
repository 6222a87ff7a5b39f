"""What a run carries through a checkpoint, and the check that a resumed run is the same run.

:class:`RunState` is the step counter and the figures a run keeps from step to step (``trainer_state.json``).
:func:`run_definition` is what makes a run this run: the settings marked ``run=True`` in
:class:`~vrpo.training.config.TrainingConfig`, the process count and the data's content; :func:`check_same_run`
refuses to resume when they differ (unless ``--allow_config_change``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CheckpointError, TrainingDiverged
from .config import TrainingConfig, run_defining
from .data import TokenizedPairs

logger = logging.getLogger("vrpo")


@dataclass
class RunState:
    """What a run carries from step to step and through a checkpoint (``trainer_state.json``)."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    last_losses: list[float] = field(default_factory=list)  # the VRPO loss of the last applied steps
    pref_acc_before: float | None = None
    final_eval: dict | None = None  # logged before the final checkpoint: not repeated when resuming from it
    gen_acc_before: float | None = None  # graded tasks only: the initial policy's generations
    gen_credit_before: float | None = None

    def to_checkpoint(self, max_steps: int, seed: int) -> dict:
        return {
            "step": self.step,
            "max_steps": max_steps,
            "seed": seed,
            **{k: v for k, v in asdict(self).items() if k != "step"},
        }

    def count(self, applied: bool, loss: float | None, keep: int) -> bool:
        """Count a finished step: keep the loss of the last ``keep`` applied steps, count the skipped ones.
        Returns whether the step was skipped."""
        if applied:
            self.consecutive_nonfinite = 0
            self.last_losses = (self.last_losses + [loss])[-max(keep, 1) :]
            return False
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        return True

    def check_streak(self, max_nonfinite: int, last_checkpoint: str | None):
        """Raise :class:`~vrpo.errors.TrainingDiverged` after ``max_nonfinite`` skipped steps in a row."""
        if self.consecutive_nonfinite >= max_nonfinite:
            raise TrainingDiverged(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss, gradient norm or weights "
                f"(--max_nonfinite_steps {max_nonfinite}); stopping at step {self.step}. "
                f"Last good checkpoint: {last_checkpoint or 'none'}"
            )

    @property
    def final_loss(self) -> float | None:
        """The mean loss of the last applied steps (None before any)."""
        return sum(self.last_losses) / len(self.last_losses) if self.last_losses else None

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        defaults = cls()
        return cls(**{k: saved.get(k, getattr(defaults, k)) for k in asdict(defaults)})


def run_definition(
    cfg: TrainingConfig, num_processes: int, train_pairs: TokenizedPairs, eval_pairs: TokenizedPairs | None
) -> dict:
    """What makes this run this run (saved with each checkpoint): the run-defining settings, the process
    count and the content of the data."""
    out = run_defining(cfg)
    out["num_processes"] = num_processes
    out["train_data"] = train_pairs.content_hash()
    out["eval_data"] = eval_pairs.content_hash() if eval_pairs is not None else None
    return out


def check_same_run(saved: dict | None, now: dict, path: str, allow_change: bool) -> bool:
    """Refuse (``ValueError``) to resume from checkpoint ``path`` when its run definition ``saved`` differs from
    ``now``, unless ``allow_change``. Returns whether the optimizer's settings must be re-applied (they must
    whenever the definitions were compared: the restored optimizer state carries the old ones)."""
    if saved is None:
        logger.warning("%s predates saved run settings; they are not compared", path)
        return False
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}/trainer_state.json: 'run' is not a JSON object; the checkpoint is corrupt")
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k, v) != v]
    if diffs and not allow_change:
        raise ValueError(
            f"--resume_from_checkpoint {path}: this run differs from the checkpoint's ({'; '.join(diffs)}); "
            "resume with the same settings and data, or pass --allow_config_change to continue with the new ones"
        )
    if diffs:
        logger.warning("resuming with changed settings (--allow_config_change): %s", "; ".join(diffs))
    return True


def apply_optimizer_settings(cfg: TrainingConfig, optimizer, scheduler):
    """Put the config's optimizer settings and peak learning rate into a restored optimizer and schedule."""
    for group in optimizer.param_groups:
        group.update(weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if not hasattr(scheduler, "lr_lambdas"):
        return
    scheduler.base_lrs = [cfg.learning_rate] * len(scheduler.base_lrs)
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = cfg.learning_rate, cfg.learning_rate * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def restore(checkpoints, path: str, definition: dict, cfg: TrainingConfig, optimizer, scheduler):
    """Restore the model, optimizer, scheduler and RNG states from checkpoint ``path`` once it is known to be
    the same run (``definition``: this run's, :func:`check_same_run`). Returns the :class:`RunState` and the
    reference's held-out terms saved with it (None when it has none)."""
    saved = checkpoints.load(path)
    if check_same_run(saved.get("run"), definition, path, cfg.allow_config_change):
        apply_optimizer_settings(cfg, optimizer, scheduler)
    ref_eval = os.path.join(path, "eval_reference.pt")
    ref_eval = torch.load(ref_eval, weights_only=True) if os.path.exists(ref_eval) else None
    return RunState.from_checkpoint(saved), ref_eval
