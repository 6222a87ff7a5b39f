"""Masked diffusion LMs on transformers: exact loading of real checkpoints (no remote code), saving back,
attention backends, one table entry per model family (:mod:`vrpo.models.families`: LLaDA, Dream).

Load a checkpoint directory (e.g. GSAI-ML/LLaDA-8B-Instruct or Dream-org/Dream-v0-Instruct-7B downloaded
beforehand); the family comes from its ``config.json``::

    from vrpo.models import family_of, load_mdm, load_tokenizer, sample, save_mdm

    model = load_mdm("/ckpt/Dream-v0-Instruct-7B", dtype=torch.bfloat16, attn_implementation="sdpa")
    logits = model(input_ids).logits                  # [B, S, vocab], bidirectional attention
    model.config.mask_token_id                        # 151666 (LLaDA: 126336)
    family_of(model).logit_shift                      # 1: Dream's output at i - 1 predicts token i (LLaDA: 0)
    ids = sample(model, prompt_ids, model.config.mask_token_id, gen_length=128)   # the family's sampler
    tokenizer = load_tokenizer("/ckpt/Dream-v0-Instruct-7B")                        # no remote code
    save_mdm(model, "/ckpt/my-dream")                 # the family's format, readable by its official code

``load_llada``/``save_llada`` and ``load_dream``/``save_dream`` do the same for one family.

Attention backends (``attn_implementation=``): ``"sdpa"`` (default), ``"eager"``, ``"flash_attention_2"``
(flash-attn + CUDA) and ``"vrpo_triton"`` (:func:`vrpo_kernels.bidirectional_attention`; force its kernel with
``VRPO_ATTENTION_IMPL=triton|torch`` or ``with attention_impl("triton"):``). Packed rows::

    kwargs = packing_kwargs(segment_ids)              # segment_ids int [B, S], -1 = padding
    logits = model(input_ids, **kwargs).logits
"""

from ..estimator.packing import BACKENDS, pack_rows, packing_kwargs, segment_positions
from .attention import (
    VRPO_TRITON,
    attention_impl,
    current_attention_impl,
    register_vrpo_attention,
)
from .dream import DREAM_MASK_TOKEN
from .dtypes import DTYPES, resolve_dtype
from .families import (
    DREAM,
    FAMILIES,
    LLADA,
    ModelFamily,
    family_of,
    family_of_config,
    family_of_tokenizer,
)
from .io import load_dream, load_llada, load_mdm, save_dream, save_llada, save_mdm
from .llada import LLADA_CHAT_TEMPLATE, LLADA_MASK_TOKEN
from .modeling import BidirectionalLlamaForCausalLM, BidirectionalQwen2ForCausalLM
from .samplers import SAMPLERS, generate, generate_dream, sample
from .tiny import build_tiny_llada, build_tiny_tokenizer, tiny_llada_config
from .tokenization import (
    collate,
    encode_example,
    encode_preference,
    get_mask_token_id,
    load_tokenizer,
)

__all__ = [
    "BACKENDS",
    "BidirectionalLlamaForCausalLM",
    "BidirectionalQwen2ForCausalLM",
    "DREAM",
    "DREAM_MASK_TOKEN",
    "DTYPES",
    "FAMILIES",
    "LLADA",
    "LLADA_CHAT_TEMPLATE",
    "LLADA_MASK_TOKEN",
    "ModelFamily",
    "SAMPLERS",
    "VRPO_TRITON",
    "attention_impl",
    "build_tiny_llada",
    "build_tiny_tokenizer",
    "collate",
    "current_attention_impl",
    "encode_example",
    "encode_preference",
    "family_of",
    "family_of_config",
    "family_of_tokenizer",
    "generate",
    "generate_dream",
    "get_mask_token_id",
    "load_dream",
    "load_llada",
    "load_mdm",
    "load_tokenizer",
    "pack_rows",
    "packing_kwargs",
    "register_vrpo_attention",
    "resolve_dtype",
    "sample",
    "save_dream",
    "save_llada",
    "save_mdm",
    "segment_positions",
    "tiny_llada_config",
]
