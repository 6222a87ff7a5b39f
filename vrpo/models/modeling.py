"""Masked diffusion LMs as transformers decoders with bidirectional attention: LLaDA (Llama) and Dream (Qwen2).

Nothing here re-implements a layer: each class is transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
whose config says ``is_causal=False`` (transformers then builds bidirectional masks and tells sdpa/flash-attn
not to be causal) and whose body also accepts ``segment_ids`` [B, S] for packed rows (see
:mod:`vrpo.models.packing`). sdpa, eager, flash_attention_2, vrpo_triton, gradient checkpointing, PEFT and
FSDP all come from transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    LlamaModel,
    PretrainedConfig,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from ..estimator.packing import backend_inputs


def _make_bidirectional(config: PretrainedConfig) -> PretrainedConfig:
    # transformers >= 5 reads config.is_causal when building masks and passes it to the attention functions.
    config.is_causal = False
    return config


class _BidirectionalBody:
    """The bidirectional decoder body, mixed in before a transformers ``*Model`` class.

    ``forward(input_ids, attention_mask=None, position_ids=None, ..., segment_ids=None)``:
    ``attention_mask`` is a 2D padding mask [B, S] (1 = token) or a ready 4D mask; ``segment_ids`` int [B, S]
    (adjacent equal ids = one sample, negative = padding) blocks attention across samples and, unless
    ``position_ids`` are given, restarts RoPE positions per sample. Other keyword arguments go to the
    transformers body unchanged.
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__(_make_bidirectional(config))
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        if segment_ids is not None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            if tuple(segment_ids.shape) != tuple(shape):
                raise ValueError(
                    f"segment_ids {tuple(segment_ids.shape)} must match the input's [B, S] = {tuple(shape)}"
                )
            packed = backend_inputs(
                self.config._attn_implementation,
                segment_ids.to(self.embed_tokens.weight.device),
                attention_mask,
                position_ids,
                dtype=inputs_embeds.dtype if inputs_embeds is not None else self.embed_tokens.weight.dtype,
            )
            attention_mask = packed.pop("attention_mask")
            position_ids = packed.pop("position_ids")
            kwargs.update(packed)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class BidirectionalLlamaModel(_BidirectionalBody, LlamaModel):
    """``LlamaModel`` with bidirectional attention that also takes ``segment_ids`` for packed rows."""


class BidirectionalQwen2Model(_BidirectionalBody, Qwen2Model):
    """``Qwen2Model`` with bidirectional attention that also takes ``segment_ids`` for packed rows."""


class BidirectionalLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` over a :class:`BidirectionalLlamaModel`: LLaDA's architecture.

    ``config.mask_token_id`` holds the mask token; ``config.llada_config`` the LLaDA config it came from.
    ``forward`` takes the same arguments as ``LlamaForCausalLM`` plus ``segment_ids``; the output has
    ``.logits`` [B, S, vocab] (not shifted: position i predicts token i).
    """

    logit_shift = 0  # read by the ELBO (vrpo.estimator.model_logit_shift) and the family table

    def __init__(self, config: PretrainedConfig):
        # LlamaForCausalLM.__init__ with the bidirectional body in place of LlamaModel.
        LlamaPreTrainedModel.__init__(self, _make_bidirectional(config))
        self.model = BidirectionalLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class BidirectionalQwen2ForCausalLM(Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` over a :class:`BidirectionalQwen2Model`: Dream's architecture.

    ``config.mask_token_id`` holds the mask token; ``config.dream_config`` the Dream config it came from.
    ``.logits`` [B, S, vocab] are shifted as Dream's are: position i - 1 predicts token i.
    """

    logit_shift = 1  # read by the ELBO (vrpo.estimator.model_logit_shift) and the family table

    def __init__(self, config: PretrainedConfig):
        Qwen2PreTrainedModel.__init__(self, _make_bidirectional(config))
        self.model = BidirectionalQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
