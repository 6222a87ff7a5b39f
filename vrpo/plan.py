"""``python -m vrpo.plan``: does a VRPO run fit on the GPUs, and how long does it take? Answered before renting them.

Takes the same flags and ``--config`` YAML as ``python -m vrpo.train`` (the model may be a checkpoint directory or
its ``config.json`` alone), plus the hardware: ``--num_gpus``, ``--gpu`` (h100, h200, a100), ``--gpu_memory_gb``,
``--distributed`` (ddp, fsdp, zero3) and ``--mfu``. It prints the per-GPU memory, part by part, whether it fits,
and the cost of one optimizer step and of a whole run (the LLaDA 1.5 paper's: 350k pairs, batch 64, n = 8;
Zhu et al. 2025, Section 4 and Appendix B)::

    python -m vrpo.plan --config examples/llada_8b_vrpo.yaml \\
        --model_name_or_path tests/fixtures/llada-8b-instruct-meta/config.json --num_gpus 8 --gpu h100

Parameter, gradient and optimizer bytes are exact: they are counted on the model built on the ``meta`` device
from the checkpoint's config (no weights are read), with FSDP2's per-tensor padding when sharded. Activations,
the fused head's working set and the step time are estimates; their formulas are printed with them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vrpo_kernels.gpus import GPUS
from vrpo_kernels.masked_linear_ce import working_set_bytes
from vrpo_kernels.masked_linear_ce.triton_path import gpu_vocab_split

from .files import read_json
from .models import DTYPES, ModelFamily, family_of, family_of_config
from .tasks import get_task
from .training.config import VRPOConfig, parse_config
from .training.probe import probe_variances

GIB = 1024**3


DISTRIBUTED = ("ddp", "fsdp", "zero3")
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# --- the model, on the meta device -------------------------------------------------------------


def read_model_config(path: str) -> tuple[dict, str]:
    """``(config.json dict, its path)`` for a checkpoint directory or a ``config.json`` file."""
    file = Path(path) / "config.json" if os.path.isdir(path) else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--model_name_or_path {path}: no such file {file}")
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return raw, str(file)


def _hf_fields(raw: dict) -> dict:
    skip = ("model_type", "architectures", "auto_map", "_name_or_path", "attn_implementation", "transformers_version")
    return {k: v for k, v in raw.items() if k not in skip}


def meta_model(cfg: VRPOConfig) -> tuple[nn.Module, ModelFamily]:
    """The policy of ``cfg`` (``--model_name_or_path``, else the demo task's model) on the meta device, built
    through its family's table entry (:mod:`vrpo.models.families`: the family's own format or a transformers
    export), in the dtype training would load it in (LoRA not applied)."""
    raw, source = read_model_config(cfg.model_name_or_path or get_task(cfg.task).model_path())
    family, native = family_of_config(raw, source)
    config = family.to_hf_config(raw, source=source) if native else family.config_class(**_hf_fields(raw))
    with torch.device("meta"):
        model = family.model_class(config)
    # The config's own dtype, as the family's converter (torch_dtype) or transformers (dtype, torch_dtype) read it.
    stored = config.dtype if isinstance(config.dtype, torch.dtype) else DTYPES.get(str(config.dtype), torch.float32)
    dtype = stored if cfg.torch_dtype == "auto" else DTYPES[cfg.torch_dtype]
    return model.to(dtype), family


# --- static bytes: exact -----------------------------------------------------------------------


def lora_shapes(model: nn.Module, cfg: VRPOConfig) -> list[torch.Size]:
    """Shapes of the LoRA A and B matrices peft adds for ``cfg`` (``--lora_target_modules``, ``--lora_r``)."""
    targets = set(cfg.lora_target_modules)
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes += [torch.Size((cfg.lora_r, module.in_features)), torch.Size((module.out_features, cfg.lora_r))]
    if not shapes:
        names = " ".join(cfg.lora_target_modules)
        raise ValueError(f"--lora_target_modules {names}: no nn.Linear of the model matches")
    return shapes


def shard_numel(shape: torch.Size, num_shards: int) -> int:
    """Elements one rank holds of a tensor FSDP2 shards on dim 0 (padded to equal chunks of ceil(d0 / N) rows)."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / num_shards) * math.prod(shape[1:])


@dataclass(frozen=True)
class Tensors:
    """A group of tensors: their shapes and one dtype."""

    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def bytes(self, num_shards: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes per rank: whole (``num_shards=1``) or an FSDP2 shard, in ``dtype`` (default: the group's)."""
        size = DTYPE_BYTES[dtype or self.dtype]
        if num_shards == 1:
            return self.numel * size
        return sum(shard_numel(s, num_shards) for s in self.shapes) * size


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about a model: its tensors and its dimensions."""

    family: str
    decoder_layer: str
    base: Tensors  # every parameter of the checkpoint
    trainable: Tensors  # full fine-tuning: the base; LoRA: the adapters (fp32, peft's default)
    layer: Tensors  # one decoder layer's parameters (an FSDP unit)
    root: Tensors  # embeddings, final norm and head (the root FSDP unit)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    matmul_params: int  # weights of the decoder layers' linear layers (FLOPs per token = 2 x this)


def model_facts(cfg: VRPOConfig, model: nn.Module | None = None) -> ModelFacts:
    """Facts about the policy of ``cfg`` (its ``model_name_or_path``, else the --task model); ``model`` (any
    device) instead of building it on the meta device."""
    if model is None:
        model, _ = meta_model(cfg)
    family = family_of(model)
    c = model.config
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype
    layer_prefix = _first_layer_prefix(params)
    layer = [p.shape for n, p in params.items() if n.startswith(layer_prefix)]
    in_layers = [n for n in params if ".layers." in n]
    root = [p.shape for n, p in params.items() if n not in in_layers]
    matmul = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)
    base = Tensors(tuple(p.shape for p in params.values()), dtype)
    trainable = Tensors(tuple(lora_shapes(model, cfg)), torch.float32) if cfg.use_lora else base
    heads = c.num_attention_heads
    return ModelFacts(
        family=family.display_name if family else type(model).__name__,
        decoder_layer=type(model.model.layers[0]).__name__, base=base, trainable=trainable,
        layer=Tensors(tuple(layer), dtype), root=Tensors(tuple(root), dtype),
        hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers, heads=heads,
        kv_heads=c.num_key_value_heads or heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        vocab=c.vocab_size, matmul_params=matmul,
    )  # fmt: skip


def _first_layer_prefix(params: dict) -> str:
    for name in params:
        if ".layers.0." in name:
            return name.split(".layers.0.")[0] + ".layers.0."
    raise ValueError("the model has no decoder layers named '*.layers.0.*'")


# --- the hardware and the run --------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The plan's own settings (the training settings are the :class:`~vrpo.training.config.VRPOConfig`)."""

    num_gpus: int = 1
    gpu: str = "h100"
    gpu_memory_gb: float | None = None  # default: the GPU's
    distributed: str = "fsdp"  # ddp (also one GPU), fsdp (accelerate FSDP2) or zero3 (DeepSpeed)
    mfu: float = 0.35
    mean_length: int | None = None  # tokens per sequence for the FLOPs (default: --max_length)
    response_fraction: float = 0.5  # of a sequence's tokens, the response
    run_pairs: int = 350_000
    reserve_gb: float = 2.0  # CUDA context, NCCL buffers, allocator fragmentation

    def __post_init__(self):
        if self.num_gpus < 1:
            raise ValueError(f"--num_gpus must be >= 1, got {self.num_gpus}")
        if self.gpu not in GPUS:
            raise ValueError(f"--gpu must be one of {', '.join(GPUS)}, got {self.gpu!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"--distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")
        if not 0 < self.response_fraction <= 1:
            raise ValueError(f"--response_fraction must be in (0, 1], got {self.response_fraction}")
        for name in ("mean_length", "run_pairs", "gpu_memory_gb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be > 0, got {value}")

    @property
    def shards(self) -> int:
        """Ranks the policy's parameters, gradients and optimizer state are split over."""
        return 1 if self.distributed == "ddp" else self.num_gpus

    @property
    def capacity(self) -> int:
        gb = self.gpu_memory_gb if self.gpu_memory_gb is not None else GPUS[self.gpu].memory_gb
        return int(gb * 1e9)


@dataclass(frozen=True)
class Item:
    """One line of the plan: a name, bytes (or FLOPs, seconds...) and how it was obtained."""

    name: str
    value: float
    how: str


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


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vrpo.plan", add_help=False, description=__doc__.split("\n\n")[0])
    d = Setup()
    p.add_argument("--num_gpus", type=int, default=d.num_gpus, help="GPUs (processes) of the run.")
    p.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS), help="GPU model (peak FLOP/s and memory).")
    p.add_argument("--gpu_memory_gb", type=float, default=None, help="Memory per GPU in GB (default: the GPU's).")
    p.add_argument(
        "--distributed",
        default=None,
        choices=DISTRIBUTED,
        help="ddp, fsdp (examples/accelerate_fsdp.yaml) or zero3 (examples/accelerate_deepspeed_zero3."
        "yaml). Default: fsdp on several GPUs, ddp on one.",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=d.mfu,
        help="Assumed model FLOPs utilisation (model FLOPs, no recomputation, over peak bf16).",
    )
    p.add_argument(
        "--mean_length",
        type=int,
        default=None,
        help="Mean tokens per sequence for the FLOPs (default: --max_length; memory always assumes max_length).",
    )
    p.add_argument(
        "--response_fraction",
        type=float,
        default=d.response_fraction,
        help="Fraction of a sequence's tokens that are the response.",
    )
    p.add_argument(
        "--run_pairs", type=int, default=d.run_pairs, help="Training pairs of the whole run (the paper: 350k)."
    )
    p.add_argument(
        "--probe_steps",
        type=int,
        default=0,
        help="Also run the first K training steps on the run's "
        "model and data (CPU is fine; nothing is saved) and print the budget advisor's advice: the "
        "score's mask and pair variances and the n_t of least score noise at the run's forward passes "
        "(and the loss-error criterion's choice, for comparison).",
    )
    p.add_argument(
        "--reserve_gb",
        type=float,
        default=d.reserve_gb,
        help="GB per GPU kept for the CUDA context, communication buffers and fragmentation.",
    )
    return p


def parse(argv: list[str]) -> tuple[VRPOConfig, Setup, int]:
    """``(training config, plan setup, --probe_steps)`` from the command line; ``--help`` shows both sets of flags."""
    parser = _plan_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nTraining flags (the same as python -m vrpo.train):")
        parse_config(["--help"])
    ns, rest = parser.parse_known_args(argv)
    cfg = parse_config(rest)
    values = vars(ns)
    probe_steps = values.pop("probe_steps")
    if probe_steps < 0:
        parser.error(f"--probe_steps must be >= 0, got {probe_steps}")
    values["distributed"] = ns.distributed or ("fsdp" if ns.num_gpus > 1 else "ddp")
    try:
        setup = Setup(**values)
    except ValueError as e:
        parser.error(str(e))
    return cfg, setup, probe_steps


def resolved(cfg: VRPOConfig) -> VRPOConfig:
    """``cfg`` with its ``None`` fields filled as a run would fill them (the --task presets for its model)."""
    return cfg.resolved(get_task(cfg.task).presets if cfg.model_name_or_path is None else None)


def main(argv: list[str] | None = None) -> int:
    cfg, setup, probe_steps = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        facts = model_facts(resolved(cfg))
    except (FileNotFoundError, ValueError) as e:
        print(f"vrpo.plan: error: {e}", file=sys.stderr)
        return 2
    print(report(resolved(cfg), facts, setup))
    if probe_steps:
        try:
            found = probe_variances(cfg, probe_steps, get_task(cfg.task))
        except (FileNotFoundError, ValueError) as e:
            print(f"vrpo.plan: error: {e}", file=sys.stderr)
            return 2
        print(probe_report(found))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
