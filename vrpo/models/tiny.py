"""A tiny LLaDA-shaped model and tokenizer, built in-process (no downloads): for tests and CPU demos.

The default sizes match the tiny LLaDA test checkpoint (``tests/fixtures/llada-tiny``): d_model 64, 4 heads, 2
layers, FFN 96, vocabulary
256 with LLaDA's special tokens at the top (mask 250, EOS/pad 251), so the tiny tokenizer and that fixture's
weights fit together.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .attention import check_backend
from .llada import (
    LLADA_CHAT_TEMPLATE,
    LLADA_CONFIG_TEMPLATE,
    LLADA_MASK_TOKEN,
    llada_to_llama_config,
)
from .modeling import BidirectionalLlamaForCausalLM

# LLaDA's special tokens, in the order they take the top ids of the tiny vocabulary.
TINY_SPECIAL_TOKENS = (
    LLADA_MASK_TOKEN,
    "<|endoftext|>",
    "<|startoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
_UNK = "<|unk|>"


def tiny_llada_config(
    *,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    n_layers: int = 2,
    mlp_hidden_size: int = 96,
    vocab_size: int = 256,
    max_sequence_length: int = 4096,
    rms_norm_eps: float = 1e-5,
    rope_theta: float = 500000.0,
    weight_tying: bool = False,
) -> LlamaConfig:
    """The bidirectional Llama config of a tiny LLaDA (LLaDA-8B's config with small dimensions).

    Special ids follow :func:`build_tiny_tokenizer`: mask ``vocab_size - 6``, EOS/pad ``vocab_size - 5``,
    BOS ``vocab_size - 4``.
    """
    if vocab_size < 128:
        raise ValueError(f"tiny_llada_config: vocab_size={vocab_size} leaves no room for the characters (>= 128)")
    llada = dict(LLADA_CONFIG_TEMPLATE)
    llada.update(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads,
        n_layers=n_layers,
        mlp_hidden_size=mlp_hidden_size,
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        max_sequence_length=max_sequence_length,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        weight_tying=weight_tying,
        mask_token_id=vocab_size - 6,
        eos_token_id=vocab_size - 5,
        pad_token_id=vocab_size - 5,
        torch_dtype="float32",
        init_device="cpu",
    )
    config = llada_to_llama_config(llada, source="tiny_llada_config")
    config.bos_token_id = vocab_size - 4
    return config


def build_tiny_llada(
    config: LlamaConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **config_kwargs,
) -> BidirectionalLlamaForCausalLM:
    """A randomly initialised tiny LLaDA (eval mode), the same for the same ``seed`` on the CPU.

    ``config`` defaults to ``tiny_llada_config(**config_kwargs)``. RMSNorm weights are perturbed away from 1
    so that a test notices a misplaced norm.
    """
    if config is None:
        config = tiny_llada_config(**config_kwargs)
    elif config_kwargs:
        raise TypeError(f"build_tiny_llada: pass either config or config fields, not both ({sorted(config_kwargs)})")
    attn = check_backend(attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BidirectionalLlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def build_tiny_tokenizer(vocab_size: int = 256, chat_template: str = LLADA_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` with LLaDA's special tokens and chat template.

    Ids: tab, newline and printable ASCII first, then ``<|unk|>`` and reserved fillers, then
    :data:`TINY_SPECIAL_TOKENS` at ``vocab_size - 6 .. vocab_size - 1``. ``mask_token`` is ``<|mdm_mask|>``,
    ``eos_token``/``pad_token`` ``<|endoftext|>``, ``bos_token`` ``<|startoftext|>``. It round-trips through
    ``save_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    chars = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
    n_fill = vocab_size - len(chars) - 1 - len(TINY_SPECIAL_TOKENS)
    if n_fill < 0:
        raise ValueError(f"build_tiny_tokenizer: vocab_size={vocab_size} is too small (needs >= {vocab_size - n_fill})")
    tokens = chars + [_UNK] + [f"<|reserved_token_{i}|>" for i in range(n_fill)] + list(TINY_SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=_UNK))
    # One token per character; decoding glues them back together.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (_UNK, *TINY_SPECIAL_TOKENS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=_UNK,
        mask_token=LLADA_MASK_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast
