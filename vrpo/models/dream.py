"""Dream's checkpoint schema <-> transformers' Qwen2 schema.

Dream-v0 (``model_type="Dream"``, remote code ``DreamModel``) is Qwen2 with bidirectional attention: its
parameter names are exactly transformers' ``Qwen2ForCausalLM`` names (q/k/v projections with biases), so
the key mapping is the identity and only the config differs. Its logits are shifted like an autoregressive
LM's: the output at position ``i - 1`` predicts the token at ``i``.
"""

from __future__ import annotations

import copy

from transformers import Qwen2Config

from .dtypes import DTYPES
from .llada import check_supported, checked_mask_token_id, positive_int

DREAM_MODEL_TYPE = "Dream"
DREAM_MASK_TOKEN = "<|mask|>"

# Dream-v0-Instruct-7B's config.json: the schema save_dream writes when a model does not carry the config it
# was loaded from. Dimensions and ids are overwritten on save.
DREAM_CONFIG_TEMPLATE: dict = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": DREAM_MODEL_TYPE,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# Dream options whose other values the Qwen2 implementation here does not express (sliding-window attention
# is causal-window machinery; M-RoPE is for vision inputs). A config that sets any of them is refused.
_DREAM_REQUIRED = {"use_sliding_window": False, "use_mrope": False, "hidden_act": "silu", "rope_scaling": None}


def dream_to_qwen2_config(dream: dict, *, source: str = "config.json", mask_token_id: int | None = None) -> Qwen2Config:
    """A bidirectional ``Qwen2Config`` equivalent to a Dream ``config.json`` (a dict).

    The original dict is kept as ``config.dream_config`` for :func:`qwen2_to_dream_config`.
    ``mask_token_id`` overrides (or supplies) the config's mask id.
    """
    check_supported(dream, _DREAM_REQUIRED, source, "Dream", "Qwen2")
    hidden = positive_int(dream, "hidden_size", source)
    heads = positive_int(dream, "num_attention_heads", source)
    kv_heads = dream.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    vocab = positive_int(dream, "vocab_size", source)
    mask_token_id = checked_mask_token_id(
        dream.get("mask_token_id") if mask_token_id is None else mask_token_id,
        vocab,
        source,
        f"Dream: 151666, token {DREAM_MASK_TOKEN!r}",
    )
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=positive_int(dream, "intermediate_size", source),
        num_hidden_layers=positive_int(dream, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=dream.get("max_position_embeddings") or 32768,
        initializer_range=dream.get("initializer_range") or 0.02,
        rms_norm_eps=dream.get("rms_norm_eps", 1e-6),
        rope_theta=float(dream.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(dream.get("tie_word_embeddings", False)),
        attention_dropout=dream.get("attention_dropout") or 0.0,
        use_sliding_window=False,
        bos_token_id=dream.get("bos_token_id"),
        eos_token_id=dream.get("eos_token_id"),
        pad_token_id=dream.get("pad_token_id"),
        use_cache=False,
        is_causal=False,
        mask_token_id=int(mask_token_id),
        dream_config=copy.deepcopy(dream),
    )
    if dream.get("torch_dtype") in DTYPES:
        config.dtype = DTYPES[dream["torch_dtype"]]
    return config


def qwen2_to_dream_config(config: Qwen2Config, dtype=None) -> dict:
    """Dream's ``config.json`` schema (a dict, ``model_type="Dream"``) for a bidirectional Qwen2 ``config``.

    Fields Dream shares with Qwen2 come from ``config``; the rest from the Dream config the model was loaded
    from (``config.dream_config``) or, failing that, Dream-v0-Instruct-7B's.
    """
    if getattr(config, "is_causal", True):
        raise ValueError("qwen2_to_dream_config: the config is causal (is_causal is not False); Dream is bidirectional")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("qwen2_to_dream_config: sliding-window attention has no Dream equivalent")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"qwen2_to_dream_config: rope_type={rope.get('rope_type')!r} has no Dream equivalent")
    base = copy.deepcopy(getattr(config, "dream_config", None) or DREAM_CONFIG_TEMPLATE)
    base.update(
        model_type=DREAM_MODEL_TYPE,
        architectures=["DreamModel"],
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        max_window_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        rope_scaling=None,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        max_position_embeddings=config.max_position_embeddings,
        attention_dropout=config.attention_dropout,
        use_sliding_window=False,
        sliding_window=None,
        use_mrope=False,
        mask_token_id=getattr(config, "mask_token_id", None),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if dtype is not None:
        base["torch_dtype"] = str(dtype).removeprefix("torch.")
    for key in ("transformers_version", "_name_or_path"):
        base.pop(key, None)
    return dict(sorted(base.items()))
