"""LLaDA's checkpoint schema <-> transformers' Llama schema: config fields and parameter names.

LLaDA's modeling is a Llama decoder with bidirectional attention, so a LLaDA checkpoint maps onto a
``LlamaConfig(is_causal=False)`` plus renamed parameter keys:

================================================  ==========================================
LLaDA key                                         transformers Llama key
================================================  ==========================================
``model.transformer.wte.weight``                  ``model.embed_tokens.weight``
``model.transformer.blocks.N.attn_norm.weight``   ``model.layers.N.input_layernorm.weight``
``model.transformer.blocks.N.{q,k,v}_proj.weight````model.layers.N.self_attn.{q,k,v}_proj.weight``
``model.transformer.blocks.N.attn_out.weight``    ``model.layers.N.self_attn.o_proj.weight``
``model.transformer.blocks.N.ff_norm.weight``     ``model.layers.N.post_attention_layernorm.weight``
``model.transformer.blocks.N.ff_proj.weight``     ``model.layers.N.mlp.gate_proj.weight``
``model.transformer.blocks.N.up_proj.weight``     ``model.layers.N.mlp.up_proj.weight``
``model.transformer.blocks.N.ff_out.weight``      ``model.layers.N.mlp.down_proj.weight``
``model.transformer.ln_f.weight``                 ``model.norm.weight``
``model.transformer.ff_out.weight``               ``lm_head.weight`` (absent when weights are tied)
================================================  ==========================================
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import LlamaConfig

from .dtypes import DTYPES

LLADA_MODEL_TYPE = "llada"
LLADA_MASK_TOKEN = "<|mdm_mask|>"

# LLaDA-8B-Instruct's chat template (from its tokenizer_config.json).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

# LLaDA-8B-Instruct's config.json: the schema save_llada writes when
# a model does not carry the config it was loaded from. Dimensions and ids are overwritten on save.
LLADA_CONFIG_TEMPLATE: dict = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "flash_attn_varlen": True,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}

# LLaDA options whose non-default values the Llama implementation does not express. A config that sets any of
# them is refused rather than loaded into a model that would compute something else.
_LLADA_REQUIRED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "alibi": False,
    "rope": True,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "clip_qkv": None,
}


def positive_int(cfg: dict, name: str, source: str) -> int:
    """``cfg[name]`` when it is a positive integer; ``ValueError`` naming ``source`` and the field otherwise."""
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    return value


def check_supported(cfg: dict, required: dict, source: str, family: str, implementation: str) -> None:
    """``ValueError`` naming ``source`` when ``cfg`` sets an option of ``required`` to another value: the
    transformers ``implementation`` would compute a different model than ``family``'s code."""
    for name, value in required.items():
        if name in cfg and cfg[name] != value:
            raise ValueError(
                f"{source}: {family} option {name}={cfg[name]!r} is not supported (only {value!r}); "
                f"the {implementation} implementation would compute a different model"
            )


def checked_mask_token_id(mask_token_id, vocab: int, source: str, hint: str) -> int:
    """``mask_token_id`` as an int inside the vocabulary; ``ValueError`` naming ``source`` (and, when it is
    missing, ``hint``: the family's mask token) otherwise."""
    if mask_token_id is None:
        raise ValueError(f"{source} has no mask_token_id; pass mask_token_id=... explicitly ({hint})")
    if not 0 <= int(mask_token_id) < vocab:
        raise ValueError(f"{source}: mask_token_id={mask_token_id} is outside the embedding of {vocab} rows")
    return int(mask_token_id)


def llada_to_llama_config(llada: dict, *, source: str = "config.json", mask_token_id: int | None = None) -> LlamaConfig:
    """A bidirectional ``LlamaConfig`` equivalent to a LLaDA ``config.json`` (a dict).

    The embedding and LM-head matrices have ``embedding_size`` rows when it is set (LLaDA pads the
    vocabulary), so that is the Llama ``vocab_size``. The original dict is kept as ``config.llada_config`` for
    :func:`llama_to_llada_config`. ``mask_token_id`` overrides (or supplies) the config's mask id.
    """
    check_supported(llada, _LLADA_REQUIRED, source, "LLaDA", "Llama")
    d_model = positive_int(llada, "d_model", source)
    n_heads = positive_int(llada, "n_heads", source)
    n_layers = positive_int(llada, "n_layers", source)
    if d_model % n_heads:
        raise ValueError(f"{source}: d_model={d_model} is not divisible by n_heads={n_heads}")
    if llada.get("multi_query_attention"):
        n_kv_heads = 1
    else:
        n_kv_heads = llada.get("n_kv_heads") or n_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"{source}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    mlp = llada.get("mlp_hidden_size") or llada.get("mlp_ratio", 4) * d_model
    vocab = llada.get("embedding_size") or positive_int(llada, "vocab_size", source)
    mask_token_id = checked_mask_token_id(
        llada.get("mask_token_id") if mask_token_id is None else mask_token_id,
        vocab,
        source,
        f"LLaDA: 126336, token {LLADA_MASK_TOKEN!r}",
    )
    dtype = llada.get("torch_dtype")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=llada.get("max_sequence_length") or 4096,
        initializer_range=llada.get("init_std") or 0.02,
        rms_norm_eps=llada.get("rms_norm_eps", 1e-5),
        rope_theta=float(llada.get("rope_theta", 10000.0)),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=llada.get("attention_dropout") or 0.0,
        tie_word_embeddings=bool(llada.get("weight_tying", False)),
        bos_token_id=llada.get("bos_token_id"),
        eos_token_id=llada.get("eos_token_id"),
        pad_token_id=llada.get("pad_token_id"),
        use_cache=False,
        is_causal=False,
        mask_token_id=int(mask_token_id),
        llada_config=copy.deepcopy(llada),
    )
    if dtype in DTYPES:
        config.dtype = DTYPES[dtype]
    return config


def llama_to_llada_config(config: LlamaConfig, dtype: torch.dtype | None = None) -> dict:
    """LLaDA's ``config.json`` schema (a dict, ``model_type="llada"``) for a Llama-schema ``config``.

    Fields LLaDA shares with Llama come from ``config``; the rest come from the LLaDA config the model was
    loaded from (``config.llada_config``) or, failing that, from LLaDA-8B's. ``auto_map`` is kept here;
    :func:`~vrpo.models.save_mdm` drops it unless the remote-code files it names are written alongside.
    """
    if getattr(config, "is_causal", True):
        raise ValueError("llama_to_llada_config: the config is causal (is_causal is not False); LLaDA is bidirectional")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("llama_to_llada_config: LLaDA checkpoints have no biases (attention_bias/mlp_bias are set)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"llama_to_llada_config: rope_type={rope.get('rope_type')!r} has no LLaDA equivalent")
    base = copy.deepcopy(getattr(config, "llada_config", None) or LLADA_CONFIG_TEMPLATE)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError("llama_to_llada_config: LLaDA needs head_dim * num_attention_heads == hidden_size")
    vocab = config.vocab_size
    llada_vocab = base.get("vocab_size")
    base.update(
        model_type=LLADA_MODEL_TYPE,
        architectures=["LLaDAModelLM"],
        auto_map=base.get("auto_map") or LLADA_CONFIG_TEMPLATE["auto_map"],
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        multi_query_attention=None,
        n_layers=config.num_hidden_layers,
        mlp_hidden_size=config.intermediate_size,
        embedding_size=vocab,
        # LLaDA's vocab_size may be smaller than its (padded) embedding; keep it unless the embedding shrank.
        vocab_size=llada_vocab if isinstance(llada_vocab, int) and llada_vocab <= vocab else vocab,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        weight_tying=bool(config.tie_word_embeddings),
        max_sequence_length=config.max_position_embeddings,
        attention_dropout=config.attention_dropout,
        mask_token_id=getattr(config, "mask_token_id", None),
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        use_cache=False,
    )
    if config.bos_token_id is not None:
        base["bos_token_id"] = config.bos_token_id
    if dtype is not None:
        base["torch_dtype"] = str(dtype).removeprefix("torch.")
    for key in ("transformers_version", "_name_or_path"):
        base.pop(key, None)
    return dict(sorted(base.items()))


# (LLaDA name, Llama name) of every parameter prefix; {i} is the block index. A block's ff_out is the
# MLP's down projection, the top-level ff_out is the LM head.
_KEY_PAIRS = [
    ("model.transformer.wte.", "model.embed_tokens."),
    ("model.transformer.ln_f.", "model.norm."),
    ("model.transformer.ff_out.", "lm_head."),
    ("model.transformer.blocks.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
    ("model.transformer.blocks.{i}.ff_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("model.transformer.blocks.{i}.q_proj.", "model.layers.{i}.self_attn.q_proj."),
    ("model.transformer.blocks.{i}.k_proj.", "model.layers.{i}.self_attn.k_proj."),
    ("model.transformer.blocks.{i}.v_proj.", "model.layers.{i}.self_attn.v_proj."),
    ("model.transformer.blocks.{i}.attn_out.", "model.layers.{i}.self_attn.o_proj."),
    ("model.transformer.blocks.{i}.ff_proj.", "model.layers.{i}.mlp.gate_proj."),
    ("model.transformer.blocks.{i}.up_proj.", "model.layers.{i}.mlp.up_proj."),
    ("model.transformer.blocks.{i}.ff_out.", "model.layers.{i}.mlp.down_proj."),
]


def _rules(pairs):
    """(compiled prefix pattern, replacement) for each (source, target) prefix pair."""
    return [
        (re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)")), dst.replace("{i}", r"\1")) for src, dst in pairs
    ]


_TO_HF = _rules(_KEY_PAIRS)
_TO_LLADA = _rules([(hf, llada) for llada, hf in _KEY_PAIRS])


def _rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return None


def llada_to_hf_key(key: str) -> str | None:
    """The Llama parameter name for a LLaDA checkpoint key, or None when ``key`` is not a LLaDA parameter."""
    return _rename(key, _TO_HF)


def hf_to_llada_key(key: str) -> str | None:
    """The LLaDA checkpoint key for a Llama parameter name, or None when it has no LLaDA counterpart."""
    return _rename(key, _TO_LLADA)
