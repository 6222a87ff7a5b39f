"""A probe before a long run: a few real training steps on the run's model and data, for the budget advisor
(``python -m vrpo.plan --probe_steps K``)."""

from __future__ import annotations

import dataclasses
import tempfile

from . import advisor_tally
from .config import VRPOConfig
from .preference import VRPOTrainer
from .task import GradedTask


def probe_variances(config: VRPOConfig, steps: int, task: GradedTask | None = None) -> dict:
    """Run the first ``steps`` optimizer steps of ``config``'s run (its schedule, masks and updates; outputs in
    a temporary directory, deleted after) and return :meth:`~vrpo.training.advisor_tally.VarianceTally.summary` of
    the last ``ceil(steps / 2)`` steps: both variances, the advised ``n_t`` and the sentence. The first steps
    are left out because the run starts at the reference, where antithetic scores are exactly 0 (and the
    warm-up keeps the policy there for a while).

    Raises ``ValueError`` naming the flag when the run cannot estimate the variances (``--n_t`` or
    ``--per_device_train_batch_size`` below 2) or has fewer steps than asked."""
    if steps < 1:
        raise ValueError(f"--probe_steps must be a positive integer, got {steps}")
    if not isinstance(config, VRPOConfig):
        raise ValueError(f"--probe_steps measures VRPO's score variances: not --algorithm {config.algorithm}")
    if config.algorithm == "naive_dpo" or config.n_t < 2:
        raise ValueError(
            "--probe_steps needs --n_t >= 2 (and no --naive_dpo): one timestep per pair cannot "
            "separate the mask variance from the pair variance"
        )
    with tempfile.TemporaryDirectory(prefix="vrpo-probe-") as tmp:
        cfg = dataclasses.replace(config, output_dir=tmp, report_to="none", resume_from_checkpoint=None)
        trainer = VRPOTrainer(cfg, task=task)
        try:
            if trainer.config.per_device_train_batch_size < 2:
                raise ValueError(
                    "--probe_steps needs --per_device_train_batch_size >= 2: the pair variance is "
                    "estimated within a micro-batch"
                )
            if steps > trainer.max_steps:
                raise ValueError(f"--probe_steps {steps} is more than the run's {trainer.max_steps} steps")
            tally = advisor_tally.VarianceTally()
            for step in range(steps):
                applied, metrics, _ = trainer.train_step(step)
                if applied and step >= steps // 2:
                    tally.add(metrics)
        finally:
            trainer.close()
    out = tally.summary(trainer.schedule.global_batch, trainer.plan)
    if not out:
        raise ValueError(f"--probe_steps {steps}: every measured step was skipped (non-finite loss); nothing to advise")
    if out[advisor_tally.VAR_MASK] == 0:
        raise ValueError(
            f"--probe_steps {steps}: every score was 0, the policy has not left the reference yet "
            f"(antithetic samples of equal models cancel); probe more steps than the "
            f"{trainer.config.warmup_steps} warm-up steps"
        )
    return {
        **out,
        "probe_steps": steps,
        "batch": trainer.schedule.global_batch,
        "n_t": trainer.plan.n_t,
        "n_yt": trainer.plan.n_yt,
    }
