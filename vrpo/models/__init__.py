"""Masked diffusion LMs on transformers: exact loading of real checkpoints (no remote code), saving back,
attention backends, one table entry per model family (:mod:`vrpo.models.families`: LLaDA, Dream).

Load a checkpoint directory (e.g. GSAI-ML/LLaDA-8B-Instruct or Dream-org/Dream-v0-Instruct-7B downloaded
beforehand); the family comes from its ``config.json``::

    from vrpo.models import family_of, load_mdm, save_mdm

    model = load_mdm("/ckpt/Dream-v0-Instruct-7B", dtype=torch.bfloat16, attn_implementation="sdpa")
    logits = model(input_ids).logits                  # [B, S, vocab], bidirectional attention
    model.config.mask_token_id                        # 151666 (LLaDA: 126336)
    family_of(model).logit_shift                      # 1: Dream's output at i - 1 predicts token i (LLaDA: 0)
    save_mdm(model, "/ckpt/my-dream")                 # the family's format, readable by its official code

``load_llada``/``save_llada`` and ``load_dream``/``save_dream`` do the same for one family.

Attention backends (``attn_implementation=``): ``"sdpa"`` (default), ``"eager"``, ``"flash_attention_2"``
(flash-attn + CUDA) and ``"vrpo_triton"`` (:func:`vrpo_kernels.bidirectional_attention`; force its kernel with
``VRPO_ATTENTION_IMPL=triton|torch`` or ``with attention_impl("triton"):``). Packed rows::

    kwargs = packing_kwargs(segment_ids)              # segment_ids int [B, S], -1 = padding
    logits = model(input_ids, **kwargs).logits
"""

from .attention import (
    VRPO_TRITON,
    attention_impl,
    check_backend,
    current_attention_impl,
    register_vrpo_attention,
)
from .checkpoint import CheckpointError, load_dream, load_llada, load_mdm, save_dream, save_llada, save_mdm
from .config import (
    LLADA_MASK_TOKEN,
    hf_to_llada_key,
    llada_to_hf_key,
    llada_to_llama_config,
    llama_to_llada_config,
)
from .dream import DREAM_MASK_TOKEN, dream_to_qwen2_config, qwen2_to_dream_config
from .dtypes import DTYPES, resolve_dtype
from .families import (
    DREAM,
    FAMILIES,
    LLADA,
    ModelFamily,
    family_of,
    family_of_config,
    family_of_tokenizer,
    logit_shift,
)
from .modeling import (
    BidirectionalLlamaForCausalLM,
    BidirectionalLlamaModel,
    BidirectionalQwen2ForCausalLM,
    BidirectionalQwen2Model,
)
from .packing import (
    BACKENDS,
    block_diagonal_mask,
    canonical_segments,
    flash_varlen_kwargs,
    pack_rows,
    packing_kwargs,
    segment_positions,
)
from .tiny import LLADA_CHAT_TEMPLATE, build_tiny_llada, build_tiny_tokenizer, tiny_llada_config

__all__ = [
    "BACKENDS",
    "BidirectionalLlamaForCausalLM",
    "BidirectionalLlamaModel",
    "BidirectionalQwen2ForCausalLM",
    "BidirectionalQwen2Model",
    "CheckpointError",
    "DREAM",
    "DREAM_MASK_TOKEN",
    "DTYPES",
    "FAMILIES",
    "LLADA",
    "ModelFamily",
    "LLADA_CHAT_TEMPLATE",
    "LLADA_MASK_TOKEN",
    "VRPO_TRITON",
    "attention_impl",
    "block_diagonal_mask",
    "build_tiny_llada",
    "build_tiny_tokenizer",
    "canonical_segments",
    "check_backend",
    "current_attention_impl",
    "dream_to_qwen2_config",
    "family_of",
    "family_of_config",
    "family_of_tokenizer",
    "flash_varlen_kwargs",
    "hf_to_llada_key",
    "llada_to_hf_key",
    "llada_to_llama_config",
    "llama_to_llada_config",
    "load_dream",
    "load_llada",
    "load_mdm",
    "logit_shift",
    "pack_rows",
    "packing_kwargs",
    "qwen2_to_dream_config",
    "register_vrpo_attention",
    "resolve_dtype",
    "save_dream",
    "save_llada",
    "save_mdm",
    "segment_positions",
    "tiny_llada_config",
]
