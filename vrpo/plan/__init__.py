"""``python -m vrpo.plan``: does a VRPO run fit on the GPUs, and how long does it take? Answered before renting them.

:mod:`.facts` builds the model on the ``meta`` device and counts its tensors, :mod:`.settings` holds the plan's own
settings (the hardware and the run), :mod:`.memory` prices the memory per GPU, :mod:`.compute` the FLOPs and time,
:mod:`.report` writes the plan as text, and :mod:`.cli` parses the flags (``python -m vrpo.plan`` runs its
:func:`main`). The flags and the estimates: docs/training.md.
"""

from .cli import _plan_parser, main, parse
from .compute import Compute, compute
from .facts import (
    DTYPE_BYTES,
    GIB,
    ModelFacts,
    Tensors,
    _first_layer_prefix,
    _hf_fields,
    lora_shapes,
    meta_model,
    model_facts,
    read_model_config,
    resolved,
    shard_numel,
)
from .memory import (
    ACTIVATION_FORMULA,
    Memory,
    activation_memory,
    adamw_temporary,
    compute_dtype,
    gathered_units,
    layer_activation_bytes,
    master_dtype,
    memory,
    peak_memory_bytes,
    reference_item,
    static_memory,
    tokens_per_micro_batch,
)
from .report import _gb, probe_report, report
from .settings import DISTRIBUTED, Item, Setup

__all__ = [
    "ACTIVATION_FORMULA",
    "Compute",
    "DISTRIBUTED",
    "DTYPE_BYTES",
    "GIB",
    "Item",
    "Memory",
    "ModelFacts",
    "Setup",
    "Tensors",
    "_first_layer_prefix",
    "_gb",
    "_hf_fields",
    "_plan_parser",
    "activation_memory",
    "adamw_temporary",
    "compute",
    "compute_dtype",
    "gathered_units",
    "layer_activation_bytes",
    "lora_shapes",
    "main",
    "master_dtype",
    "memory",
    "meta_model",
    "model_facts",
    "parse",
    "peak_memory_bytes",
    "probe_report",
    "read_model_config",
    "reference_item",
    "report",
    "resolved",
    "shard_numel",
    "static_memory",
    "tokens_per_micro_batch",
]
