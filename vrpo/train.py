"""``python -m vrpo.train``: VRPO preference optimization (or, ``--algorithm grpo``, online RL) of a masked
diffusion LM.

With no arguments it trains a bundled tiny SFT LLaDA on its own answers to the long-sorting task (8 to 16
digits; ``--task sort`` for the short demo, or another of :data:`vrpo.tasks.TASKS`), ranked by a verifier, on
the CPU in about a minute and a half, and reports exact-sort accuracy and partial credit of its generations on
the task's test prompts and held-out preference accuracy before and after. Point it at a real LLaDA or Dream
checkpoint and a preference dataset for the real thing; see ``--help`` and the README.
"""

from __future__ import annotations

import logging
import sys

from .errors import (
    CheckpointError,
    DataError,
    Interrupted,
    RunLogError,
    TrainingDiverged,
)
from .tasks import get_task
from .training import trainer_for
from .training.config import PROG, parse_config


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "datasets", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        task = get_task(config.task)
        trainer = trainer_for(config, task=task)  # tokenizer -> data -> models -> optimizer (-> checkpoint)
        summary = trainer.train()  # the loop, then the outputs
    except (
        DataError,
        CheckpointError,
        RunLogError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        ValueError,
    ) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(f"{PROG}: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    if trainer.is_main:
        print_summary(summary, task.describe)
    return 0


def print_summary(summary: dict, describe=None):
    """The closing summary: the figures before and after, graded samples (``describe``: the task's one-line
    form of a graded sample), and every output."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    name = {"grpo": "GRPO", "naive_dpo": "Naive DPO"}.get(summary.get("algorithm"), "VRPO")
    lines = [
        "",
        f"{name} finished: {summary['steps']} steps in {summary['wall_s']:.0f} s "
        f"({summary['skipped_steps']} skipped), final loss {summary['final_loss']:.4f}"
        if summary.get("final_loss") is not None
        else f"{name} finished: {summary['steps']} steps in {summary['wall_s']:.0f} s",
    ]
    if summary.get("gen_acc_after") is not None:
        lines.append(
            f"  exact-sort accuracy of greedy generations on {summary['gen_prompts']} "
            f"{summary.get('gen_split', 'test')} prompts: "
            f"{pct(summary['gen_acc_before'])} -> "
            f"{pct(summary['gen_acc_after'])} (mean partial credit {summary['gen_credit_before']:.3f} -> "
            f"{summary['gen_credit_after']:.3f})"
        )
    lines += [
        f"  held-out preference accuracy (ELBO margin > 0): {pct(summary.get('pref_acc_before'))} -> "
        f"{pct(summary.get('pref_acc_after'))}",
        f"  held-out reward accuracy (implicit reward margin > 0): {pct(summary.get('reward_acc_after'))}",
    ]
    if summary.get("advice"):
        lines.append(
            f"  score variance: mask part {summary['score/var_mask']:.3g}, pair part "
            f"{summary['score/var_pairs']:.3g}; {summary['advice']}"
        )
    if summary.get("samples"):
        where = "test prompts" if summary.get("gen_acc_after") is not None else "held-out prompts"
        lines.append(f"  samples from {summary['sampler']} ({where}):")
    for sample in summary.get("samples", []):
        graded = "correct" in sample
        lines.append(
            "    "
            + (
                describe(sample)
                if graded and describe
                else f"{sample['prompt'].splitlines()[-1][:60]!r} -> {sample['answer'][:60]!r}"
            )
        )
    outputs = summary["outputs"]
    lines += [
        f"  model ({summary['family']} format): {outputs['model']}",
        f"  checkpoints: {outputs['checkpoints']}",
        f"  metrics: {outputs['metrics']}",
    ]
    if "tensorboard" in outputs:
        lines.append(f"  TensorBoard: tensorboard --logdir {outputs['tensorboard']}")
    if "plot" in outputs:
        lines.append(f"  plot: {outputs['plot']}")
    lines.append(f"  summary: {outputs['summary']}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
