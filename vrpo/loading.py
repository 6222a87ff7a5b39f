"""What a run loads, from its config: the tokenizer, the data, the policy and the reference.

Kept apart from the trainer so that the loop stays thin and each piece can be used on its own.
"""

from __future__ import annotations

import copy
import logging

import torch

from .config import VRPOConfig
from .data import DataStats, read_preference_rows, tokenize_pairs
from .models.dtypes import DTYPES

logger = logging.getLogger("vrpo")

# The embedded model: big enough to learn the toy task in a couple of CPU minutes.
TOY_MODEL = dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=128 + 8, max_sequence_length=128)


def load_tokenizer(cfg: VRPOConfig):
    """The run's tokenizer, with a mask token (raises ValueError naming the directory otherwise)."""
    from .models.tiny import build_tiny_tokenizer
    from .tokenization import load_tokenizer as load

    if cfg.toy and cfg.tokenizer_name_or_path is None:
        return build_tiny_tokenizer(vocab_size=TOY_MODEL["vocab_size"])
    path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    try:
        return load(path)
    except ValueError as e:
        raise ValueError(f"tokenizer at {path}: {e}") from e
    except OSError as e:
        raise FileNotFoundError(f"no tokenizer could be loaded from {path}: {e}") from e


def mask_token_id(cfg: VRPOConfig, tokenizer) -> int:
    from .tokenization import get_mask_token_id

    if cfg.mask_token_id is not None:
        return cfg.mask_token_id
    return get_mask_token_id(tokenizer)


def load_pairs(cfg: VRPOConfig, tokenizer):
    """``(train, eval, stats)``: tokenized pairs; eval is ``--eval_dataset`` or split off the training data."""
    from .toy import toy_dataset_path

    stats = DataStats()
    path = cfg.dataset or toy_dataset_path()
    rows = read_preference_rows(path, on_bad_rows=cfg.on_bad_rows, stats=stats)
    pairs = tokenize_pairs(rows, tokenizer, cfg.max_length, cfg.truncation, stats)
    result = {"train": stats.as_dict()}
    if cfg.eval_dataset:
        eval_stats = DataStats()
        eval_rows = read_preference_rows(cfg.eval_dataset, on_bad_rows=cfg.on_bad_rows, stats=eval_stats)
        eval_pairs = tokenize_pairs(eval_rows, tokenizer, cfg.max_length, cfg.truncation, eval_stats)
        result["eval"] = eval_stats.as_dict()
        return pairs, eval_pairs, result
    n_eval = min(cfg.eval_size, len(pairs) // 5)
    if n_eval < cfg.eval_size:
        logger.warning("holding out %d pairs for evaluation (--eval_size %d is over a fifth of the data)", n_eval, cfg.eval_size)
    # A seeded split, so the held-out pairs are the same on every process and every resume.
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(pairs), generator=g).tolist()
    eval_pairs = pairs.subset(sorted(perm[:n_eval])) if n_eval else None
    train_pairs = pairs.subset(sorted(perm[n_eval:])) if n_eval else pairs
    result["eval_size"] = n_eval
    return train_pairs, eval_pairs, result


def _dtype(cfg: VRPOConfig):
    return None if cfg.torch_dtype == "auto" else DTYPES[cfg.torch_dtype]


def attention_backend(cfg: VRPOConfig) -> str:
    """The attention backend of a run: --attn_implementation, else vrpo_triton on CUDA, sdpa on CPU."""
    if cfg.attn_implementation:
        return cfg.attn_implementation
    from vrpo_kernels import triton_available

    return "vrpo_triton" if torch.cuda.is_available() and triton_available() else "sdpa"


def load_policy(cfg: VRPOConfig):
    """The model to train: a LLaDA checkpoint, or the embedded tiny model (seeded)."""
    from .models import build_tiny_llada, load_llada

    if cfg.toy:
        model = build_tiny_llada(seed=cfg.seed, attn_implementation=attention_backend(cfg), **TOY_MODEL)
        dtype = _dtype(cfg)
        return model.to(dtype) if dtype is not None else model
    return load_llada(cfg.model_name_or_path, dtype=_dtype(cfg), attn_implementation=attention_backend(cfg), mask_token_id=cfg.mask_token_id)


def load_reference(cfg: VRPOConfig, policy):
    """The frozen reference: ``--ref_model_name_or_path``, or a copy of the initial policy."""
    from .models import load_llada

    if cfg.ref_model_name_or_path:
        ref = load_llada(cfg.ref_model_name_or_path, dtype=_dtype(cfg), attn_implementation=attention_backend(cfg),
                         mask_token_id=cfg.mask_token_id)
    else:
        ref = copy.deepcopy(policy)
    return ref.eval().requires_grad_(False)


def add_lora(cfg: VRPOConfig, policy):
    """Wrap the policy with LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none")
    return get_peft_model(policy, lora)


def last_user_message(prompt_text: str) -> str:
    """The content of the last user turn of a prompt rendered with LLaDA's chat template."""
    head = "<|start_header_id|>user<|end_header_id|>"
    if head not in prompt_text:
        return prompt_text.strip()
    return prompt_text.rsplit(head, 1)[1].split("<|eot_id|>", 1)[0].strip()


@torch.no_grad()
def sample_answers(trainer, k: int) -> list[dict]:
    """Generate answers for the first ``k`` held-out prompts with LLaDA's sampler."""
    from .generate import generate
    from .toy import is_correct

    cfg, acc = trainer.config, trainer.accelerator
    if not acc.is_main_process:
        return []
    model = acc.unwrap_model(trainer.policy_elbo).model
    was_training = model.training
    model.eval()
    pairs = trainer.eval_pairs
    out = []
    tok = trainer.tokenizer
    for i in range(min(k, len(pairs))):
        seq = pairs.sequence(i, 0)
        resp = seq["response_mask"]
        start = int(resp.argmax())
        prompt = torch.as_tensor(seq["input_ids"][:start], dtype=torch.long, device=acc.device)[None]
        gen_length = cfg.gen_length or (int(resp.sum()) if cfg.toy else 128)
        ids = generate(model, prompt, trainer.mask_token_id, gen_length=gen_length,
                       steps=cfg.gen_steps or gen_length, block_length=cfg.block_length or gen_length)
        answer = tok.decode(ids[0, start:].tolist(), skip_special_tokens=True).strip()
        record = {"prompt": last_user_message(tok.decode(prompt[0].tolist())), "answer": answer}
        if cfg.toy:
            record["correct"] = is_correct(record["prompt"], answer)
        out.append(record)
    model.train(was_training)
    return out
