"""Memory per GPU: static bytes exact (parameters, gradients, optimizer state, the reference), activations,
the fused head's working set and gathered FSDP units estimated; the peak."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vrpo_kernels.masked_linear_ce import working_set_bytes
from vrpo_kernels.masked_linear_ce.triton_path import gpu_vocab_split

from ..training.config import VRPOConfig
from .facts import DTYPE_BYTES, ModelFacts, model_facts, resolved
from .settings import Item, Setup

# --- memory ----------------------------------------------------------------------------------------


def compute_dtype(cfg: VRPOConfig, facts: ModelFacts) -> torch.dtype:
    """The dtype of activations and gathered weights: the autocast dtype, else the weights'."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision or "no", facts.base.dtype)


def master_dtype(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> torch.dtype:
    """The dtype of the trainable parameters, their gradients and AdamW's moments.

    accelerate's FSDP2 upcasts trainable parameters to fp32 under mixed precision; DeepSpeed keeps fp32 master
    weights; under DDP torch's AdamW keeps its moments in the parameters' dtype (peft's LoRA adapters are fp32).
    """
    if setup.distributed == "zero3" or (setup.distributed == "fsdp" and (cfg.mixed_precision or "no") != "no"):
        return torch.float32
    return facts.trainable.dtype


def static_memory(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> list[Item]:
    """Per-GPU bytes that live for the whole run: weights, reference, gradients, optimizer state (exact)."""
    n, master = setup.shards, master_dtype(cfg, facts, setup)
    wname = {
        "ddp": "whole on every GPU",
        "fsdp": f"FSDP2 shard, 1/{n} padded per tensor",
        "zero3": f"ZeRO-3 partition, 1/{n}",
    }[setup.distributed]
    items = []
    if cfg.use_lora:
        items.append(
            Item(
                "policy weights (frozen base)",
                facts.base.bytes(n),
                f"{facts.base.numel:,} x {DTYPE_BYTES[facts.base.dtype]} B, {wname}",
            )
        )
        items.append(
            Item(
                "LoRA adapters",
                facts.trainable.bytes(n, master),
                f"{facts.trainable.numel:,} x {DTYPE_BYTES[master]} B (r={cfg.lora_r})",
            )
        )
    elif setup.distributed == "zero3":
        items.append(
            Item(
                "policy weights (bf16 + fp32 master)",
                facts.base.bytes(n, torch.bfloat16) + facts.base.bytes(n, torch.float32),
                f"{facts.base.numel:,} x (2 + 4) B, {wname}",
            )
        )
    else:
        items.append(
            Item(
                "policy weights",
                facts.base.bytes(n, master),
                f"{facts.base.numel:,} x {DTYPE_BYTES[master]} B, {wname}",
            )
        )
    items.append(reference_item(cfg, facts, setup))
    t = facts.trainable
    items.append(Item("gradients", t.bytes(n, master), f"{t.numel:,} trainable x {DTYPE_BYTES[master]} B"))
    items.append(
        Item(
            "optimizer (AdamW moments)",
            2 * t.bytes(n, master),
            f"2 x {t.numel:,} x {DTYPE_BYTES[master]} B (step counters stay on the CPU)",
        )
    )
    return items


def reference_item(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> Item:
    if cfg.use_lora:
        return Item("reference", 0, "the policy with its adapters off: no second copy")
    if cfg.precompute_ref:
        return Item("reference", 0, "precomputed terms (2 x n float32 per pair, in CPU memory); model freed")
    if setup.distributed == "fsdp":
        return Item(
            "reference (frozen)",
            facts.base.bytes(setup.num_gpus),
            f"sharded like the policy, {DTYPE_BYTES[facts.base.dtype]} B per parameter",
        )
    return Item("reference (frozen)", facts.base.bytes(), "a whole copy on every GPU")


def tokens_per_micro_batch(cfg: VRPOConfig) -> int:
    """Tokens through the policy per micro-batch, at worst: chosen and rejected, n masked copies each, every
    sequence ``max_length`` long (packing fills rows of max_length with the same tokens)."""
    return 2 * cfg.per_device_train_batch_size * cfg.sampling_plan().n * cfg.max_length


def layer_activation_bytes(facts: ModelFacts, b: int) -> int:
    """Bytes per token one decoder layer saves for backward, with a flash-type attention (no S x S scores):
    2 RMSNorms x (4h fp32 input + 4 fp32 rsqrt + 2 b h normalised and scaled) + attention b (2 h + 2 h_kv + h)
    + 4 heads (fp32 log-sum-exp) + SwiGLU MLP 4 b I (gate, silu, up, product)."""
    h, kv = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim
    return (
        2 * (4 * facts.hidden + 4 + 2 * b * facts.hidden)
        + b * (2 * h + 2 * kv + facts.hidden)
        + 4 * facts.heads
        + 4 * b * facts.intermediate
    )


ACTIVATION_FORMULA = (
    "per token per layer: 8h + 7bh + 2b*h_kv + 4b*I + 4*heads + 8 bytes (b = activation bytes); "
    "gradient checkpointing keeps b*h per token per layer and recomputes one layer"
)


def activation_memory(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> dict[str, Item]:
    """Per-GPU transient bytes of one micro-batch (estimates; formulas in the ``how``)."""
    b = DTYPE_BYTES[compute_dtype(cfg, facts)]
    T = tokens_per_micro_batch(cfg)
    rows = int(T * setup.response_fraction)  # worst case: every response token masked
    h, V, L = facts.hidden, facts.vocab, facts.layers
    a = layer_activation_bytes(facts, b)
    out = {}
    out["no_ckpt"] = Item("activations, no checkpointing", L * T * a, f"{L} layers x {T:,} tokens x {a:,} B")
    out["ckpt"] = Item(
        "activations, checkpointing",
        L * T * b * h + T * a + 2 * T * b * h,
        f"{L} x {T:,} x {b * h:,} B saved + one layer recomputed ({T:,} x {a:,} B) + gradient in flight",
    )
    cd = compute_dtype(cfg, facts)
    budget = cfg.head_options().max_buffer_bytes
    head = working_set_bytes(
        T,
        rows,
        h,
        V,
        cd,
        weight_dtype=facts.base.dtype,
        hidden_dtype=cd,
        bias=False,
        weight_grad=not cfg.use_lora,
        max_buffer_bytes=budget,
        splits=gpu_vocab_split(rows, V, cd, setup.gpu)[0],
    )
    out["head"] = Item(
        "fused head working set",
        head.transient,
        f"vrpo_kernels' working set of masked_linear_ce: {rows:,} masked rows, V = {V:,}, fp32 "
        f"logits buffer <= --ce_max_buffer_mb {cfg.ce_max_buffer_mb}, "
        f"{'a frozen head (no d_weight)' if cfg.use_lora else 'd_weight in the compute dtype'}",
    )
    out["logits"] = Item(
        "logits the fused head avoids",
        T * V * b + 2 * rows * V * 4,
        f"[{T:,}, {V:,}] x {b} B + fp32 log-softmax of the masked rows",
    )
    ref_units = 0
    if setup.distributed == "fsdp" and not (cfg.use_lora or cfg.precompute_ref):
        ref_units = facts.root.bytes() + 2 * facts.layer.bytes()  # the sharded reference's gathered units
    out["ref"] = Item(
        "reference forward (no grad)",
        T * b * (2 * h + 3 * facts.intermediate) + ref_units,
        f"{T:,} tokens x {b} B x (2h + 3I) alive at once" + (" + its gathered root and 2 layers" if ref_units else ""),
    )
    out["gathered"] = gathered_units(cfg, facts, setup, b)
    return out


def gathered_units(cfg: VRPOConfig, facts: ModelFacts, setup: Setup, b: int) -> Item:
    """Sharded modes: the unsharded root (kept from forward to backward) and two decoder layers (one being
    computed, one prefetched), with their unsharded gradients in backward."""
    if setup.distributed == "ddp":
        return Item("gathered parameters", 0, "nothing is sharded")
    params = facts.root.bytes(dtype=compute_dtype(cfg, facts)) + 2 * facts.layer.bytes(dtype=compute_dtype(cfg, facts))
    grads = 0 if cfg.use_lora else params
    return Item(
        "gathered parameters" + ("" if cfg.use_lora else " + their gradients"),
        params + grads,
        f"root (embeddings, norm, head) + 2 x {facts.decoder_layer}, {b} B each"
        + ("" if cfg.use_lora else ", and their gradients"),
    )


@dataclass(frozen=True)
class Memory:
    """Per-GPU memory of a run: the exact static parts, the estimated transients, and the peak."""

    static: list[Item]
    transient: dict[str, Item]
    peak: int
    phase: str  # which phase peaks: "train step", "evaluation" or "optimizer step"


def memory(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> Memory:
    """The per-GPU peak is an upper bound: every static part, the gathered units, the activations of a
    micro-batch and the larger of the reference forward and the fused head's backward, all at once."""
    static = static_memory(cfg, facts, setup)
    tr = activation_memory(cfg, facts, setup)
    total = sum(i.value for i in static)
    acts = tr["ckpt" if cfg.gradient_checkpointing else "no_ckpt"].value
    train = total + tr["gathered"].value + acts + max(tr["ref"].value, tr["head"].value)
    grads = next(i.value for i in static if i.name == "gradients")
    b = DTYPE_BYTES[compute_dtype(cfg, facts)]
    eval_tokens = 2 * max(1, cfg.per_device_train_batch_size) * cfg.eval_n_t * cfg.max_length
    evaluation = total - grads + tr["gathered"].value + eval_tokens * b * (2 * facts.hidden + 3 * facts.intermediate)
    tr["eval"] = Item(
        "evaluation forward (no grad)",
        evaluation - (total - grads) - tr["gathered"].value,
        f"{eval_tokens:,} tokens (--eval_n_t {cfg.eval_n_t}) x {b} B x (2h + 3I)",
    )
    tr["adamw"] = adamw_temporary(cfg, facts, setup)
    optimizer = total + tr["adamw"].value
    phase, peak = max(
        ("train step", train), ("evaluation", evaluation), ("optimizer step", optimizer), key=lambda x: x[1]
    )
    return Memory(static, tr, int(peak), phase)


def adamw_temporary(cfg: VRPOConfig, facts: ModelFacts, setup: Setup) -> Item:
    """torch.optim.AdamW's step on CUDA (``foreach``, the default) computes ``exp_avg_sq.sqrt()`` for every
    trainable tensor at once (``torch._foreach_sqrt``) before dividing in place: one parameter-sized list
    in the master dtype beside the weights, gradients and moments (the activations are freed by then)."""
    t, master = facts.trainable, master_dtype(cfg, facts, setup)
    return Item(
        "AdamW step temporary",
        t.bytes(setup.shards, master),
        f"foreach sqrt of exp_avg_sq: {t.numel:,} x {DTYPE_BYTES[master]} B, with the static parts",
    )


def peak_memory_bytes(cfg: VRPOConfig, *, model: nn.Module | None = None, setup: Setup | None = None) -> int:
    """The plan's per-GPU peak in bytes (comparable to ``torch.cuda.max_memory_allocated``) for a run of
    ``cfg``; ``model`` (a loaded policy, before LoRA) instead of ``cfg.model_name_or_path``. One GPU by
    default: ``Setup(num_gpus=1, distributed="ddp")``."""
    cfg = resolved(cfg)
    setup = setup or Setup(num_gpus=1, distributed="ddp")
    return memory(cfg, model_facts(cfg, model), setup).peak
