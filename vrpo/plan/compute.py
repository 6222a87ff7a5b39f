"""The cost of one optimizer step (FLOPs, seconds at an assumed MFU) and of a whole run."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo_kernels.gpus import GPUS

from ..training.config import VRPOConfig
from .facts import ModelFacts
from .settings import Setup

# --- compute ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    global_batch: int
    tokens_policy: int  # per optimizer step, all GPUs
    tokens_reference: int
    flops: float  # model FLOPs per step (no recomputation)
    flops_recompute: float  # gradient checkpointing's extra forward, per step
    step_s: float
    steps: int  # of the whole run
    gpu_hours: float


def compute(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> Compute:
    """FLOPs and time per optimizer step and for the whole run, at ``setup.mfu``.

    Per token, a forward is 2 x (decoder matmul weights) + 4 L S d_attn (bidirectional attention over the
    whole sequence of S tokens); the head runs only on masked rows (expected: half the response tokens, for
    both estimators), 2 h V each forward; the fused head's backward recomputes its logits twice (8 h V).
    Backward = 2 x forward (LoRA: 1 x, no weight gradients of the frozen base).
    """
    n = cfg.sampling_plan().n
    S = setup.mean_length or cfg.max_length
    global_batch = cfg.per_device_train_batch_size * setup.num_gpus * cfg.gradient_accumulation_steps
    tokens = global_batch * 2 * n * S
    rows = tokens * setup.response_fraction * 0.5
    hV = facts.hidden * facts.vocab
    fwd = 2 * facts.matmul_params + 4 * facts.layers * S * facts.heads * facts.head_dim
    backward = 1 if cfg.use_lora else 2
    head_fwd = rows * 2 * hV if cfg.fused_head else tokens * 2 * hV
    head_bwd = rows * (4 if cfg.use_lora else 8) * hV if cfg.fused_head else tokens * (2 if cfg.use_lora else 4) * hV
    policy = tokens * fwd * (1 + backward) + head_fwd + head_bwd
    reference = tokens * fwd + head_fwd  # online, or once per pair when precomputed: the same FLOPs
    flops = policy + reference
    step_s = flops / (setup.num_gpus * GPUS[setup.gpu].bf16_flops * setup.mfu)
    steps = cfg.max_steps if cfg.max_steps > 0 else setup.run_pairs // global_batch * cfg.num_train_epochs
    return Compute(
        global_batch,
        tokens,
        tokens,
        flops,
        tokens * fwd if cfg.gradient_checkpointing else 0.0,
        step_s,
        steps,
        steps * step_s * setup.num_gpus / 3600,
    )
