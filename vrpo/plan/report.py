"""The plan as text: memory per GPU part by part (fits or not), the cost of a step and of a run, and the
budget advisor's lines after ``--probe_steps``."""

from __future__ import annotations

from vrpo_kernels.gpus import GPUS

from ..training.config import VRPOConfig
from .compute import compute
from .facts import ModelFacts
from .memory import ACTIVATION_FORMULA, memory, tokens_per_micro_batch
from .settings import Setup

# --- the report ------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f} GB"


def report(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> str:
    """The plan as text: memory per GPU (fits or not), then the cost of a step and of the run."""
    mem, comp = memory(cfg, facts, setup), compute(cfg, facts, setup)
    gpu = GPUS[setup.gpu]
    mode = {
        "ddp": "DDP (nothing sharded)" if setup.num_gpus > 1 else "one GPU",
        "fsdp": "FSDP2 through accelerate",
        "zero3": "DeepSpeed ZeRO-3",
    }[setup.distributed]
    tuning = f"LoRA r={cfg.lora_r}" if cfg.use_lora else "full fine-tuning"
    lines = [
        f"{facts.family}: {facts.base.numel / 1e9:.3f}B parameters ({facts.base.numel:,}), {facts.layers} layers, "
        f"h={facts.hidden}, I={facts.intermediate}, heads={facts.heads}/{facts.kv_heads} kv, V={facts.vocab:,}",
        f"{tuning}, {mode}, {setup.num_gpus} x {gpu.name}; weights {facts.base.dtype}, mixed precision "
        f"{cfg.mixed_precision or 'no'}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
        f"micro-batch: {cfg.per_device_train_batch_size} pair(s) x 2 x n={cfg.sampling_plan().n} masked copies x "
        f"{cfg.max_length} tokens = {tokens_per_micro_batch(cfg):,} tokens through the policy per GPU (at most)",
        "",
        "Memory per GPU (exact)",
    ]
    lines += [f"  {i.name:<40}{_gb(i.value)}   {i.how}" for i in mem.static]
    lines.append("Memory per GPU (estimated, per micro-batch)")
    ckpt = "ckpt" if cfg.gradient_checkpointing else "no_ckpt"
    for key in ("gathered", "no_ckpt", "ckpt", "head", "ref", "eval"):
        mark = " <-" if key == ckpt else ""
        i = mem.transient[key]
        lines.append(f"  {i.name + mark:<40}{_gb(i.value)}   {i.how}")
    lines.append(
        f"  {'(' + mem.transient['logits'].name + ')':<40}{_gb(mem.transient['logits'].value)}   "
        f"{mem.transient['logits'].how}"
    )
    lines.append(f"  activations: {ACTIVATION_FORMULA}")
    room = setup.capacity - int(setup.reserve_gb * 1e9)
    verdict = "FITS" if mem.peak <= room else "DOES NOT FIT"
    lines += [
        f"  {'peak (' + mem.phase + ', upper bound)':<40}{_gb(mem.peak)}",
        f"  {verdict}: {_gb(room).strip()} usable ({setup.capacity / 1e9:.0f} GB less "
        f"{setup.reserve_gb:g} GB reserve), "
        f"margin {(room - mem.peak) / 1e9:+.2f} GB",
        "",
        f"Per optimizer step (global batch {comp.global_batch} pairs, mean sequence "
        f"{setup.mean_length or cfg.max_length} "
        f"tokens, response fraction {setup.response_fraction:g})",
        f"  tokens through the policy     {comp.tokens_policy:,}",
        f"  tokens through the reference  {comp.tokens_reference:,}"
        + ("  (in the precompute pass, once per pair)" if cfg.precompute_ref else ""),
        f"  model FLOPs                   {comp.flops:.3e}"
        + (f"  (+{comp.flops_recompute:.3e} recomputed by checkpointing)" if comp.flops_recompute else ""),
        f"  time at {setup.mfu:.0%} MFU            {comp.step_s:.1f} s   "
        f"({gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16 peak per GPU)",
        f"Whole run: {comp.steps:,} steps ({setup.run_pairs:,} pairs / {comp.global_batch} per step x "
        f"{cfg.num_train_epochs} epoch(s)): {comp.steps * comp.step_s / 3600:.1f} h wall, "
        f"{comp.gpu_hours:,.0f} GPU-hours",
    ]
    return "\n".join(lines)


def probe_report(found: dict) -> str:
    """The budget advisor's lines after ``--probe_steps`` (:func:`vrpo.training.probe.probe_variances`)."""
    noise = ", ".join(f"n_t = {k}: {v:.3g}" for k, v in found["advice/noise"].items())
    error = ", ".join(f"n_t = {k}: {v:.3g}" for k, v in found["advice/loss_error"].items())
    return "\n".join(
        [
            f"Budget advice from {found['probe_steps']} probe steps (batch {found['batch']}, n_t = {found['n_t']}, "
            f"n_yt = {found['n_yt']}):",
            f"  score variance: mask part (one pair's estimate) {found['score/var_mask']:.3g}, pair part "
            f"{found['score/var_pairs']:.3g}",
            f"  predicted minibatch score noise at the same forward passes: {noise}",
            f"  predicted loss error (loss variance + squared ELBO bias; a comparison, not what the advice minimises): "
            f"{error}",
            f"  {found['advice']}",
        ]
    )
