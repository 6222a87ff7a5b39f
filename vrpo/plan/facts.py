"""The model as the plan sees it: built on the ``meta`` device from its config (no weights are read), its
tensors and dimensions; parameter bytes exact, with FSDP2's per-tensor padding when sharded."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import read_json
from ..models import DTYPES, ModelFamily, family_of, family_of_config
from ..tasks import get_task
from ..training.config import VRPOConfig

GIB = 1024**3


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


def resolved(cfg: VRPOConfig) -> VRPOConfig:
    """``cfg`` with its ``None`` fields filled as a run would fill them (the --task presets for its model)."""
    return cfg.resolved(get_task(cfg.task).presets if cfg.model_name_or_path is None else None)
