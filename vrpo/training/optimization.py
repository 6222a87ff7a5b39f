"""The optimizer and its learning-rate schedule, and the guard before an update: clip the gradients, then agree on
every process whether the step is applied."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from .config import TrainingConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, max_steps: int):
    """``(optimizer, scheduler)``: AdamW on ``params`` (``--adam_*``, ``--weight_decay``) and the
    ``--lr_scheduler_type`` schedule over ``max_steps`` optimizer steps after ``--warmup_steps``.

    The trainer steps the scheduler by hand once per optimizer step (accelerate's wrapper would step it once per
    process) and registers it for checkpointing."""
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, max_steps)


def clip_and_agree(accelerator, optimizer, params, max_grad_norm: float, bad: bool) -> tuple[bool, float]:
    """Clip the gradients of ``params`` to ``max_grad_norm`` (0: no clipping, the norm still measured). Returns
    ``(bad, grad_norm)``: the step is bad on every process when, on any, the loss was (``bad``) or the learning rate
    or the gradient norm is not finite, so that all processes skip it together."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    bad = bad or not all(math.isfinite(g["lr"]) for g in optimizer.param_groups)
    bad = bad or not torch.isfinite(torch.as_tensor(grad_norm))
    flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0), float(grad_norm)
