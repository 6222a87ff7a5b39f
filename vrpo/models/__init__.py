"""LLaDA on transformers: exact loading of real checkpoints (no remote code), saving back, attention backends.

Load a LLaDA checkpoint directory (e.g. GSAI-ML/LLaDA-8B-Instruct downloaded beforehand)::

    from vrpo.models import load_llada, save_llada

    model = load_llada("/ckpt/LLaDA-8B-Instruct", dtype=torch.bfloat16, attn_implementation="sdpa")
    logits = model(input_ids).logits                  # [B, S, vocab], bidirectional attention
    model.config.mask_token_id                        # 126336
    save_llada(model, "/ckpt/my-llada")               # LLaDA's format, readable by its official code

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
from .checkpoint import CheckpointError, load_llada, save_llada
from .config import (
    LLADA_MASK_TOKEN,
    hf_to_llada_key,
    llada_to_hf_key,
    llada_to_llama_config,
    llama_to_llada_config,
)
from .modeling import BidirectionalLlamaForCausalLM, BidirectionalLlamaModel
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
    "CheckpointError",
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
    "flash_varlen_kwargs",
    "hf_to_llada_key",
    "llada_to_hf_key",
    "llada_to_llama_config",
    "llama_to_llada_config",
    "load_llada",
    "pack_rows",
    "packing_kwargs",
    "register_vrpo_attention",
    "save_llada",
    "segment_positions",
    "tiny_llada_config",
]
