"""What a run loads, from its config, in the order a run needs it: the tokenizer, the data, the models.

Where the config names no model or no data, the run's task (:class:`~vrpo.training.task.GradedTask`) supplies
them. Kept apart from the trainer so that the loop stays thin and each piece can be used on its own.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from vrpo_kernels import triton_available

from ..estimator import ELBOModule, draw_key
from ..models import DTYPES, family_of, family_of_tokenizer, get_mask_token_id, load_mdm
from ..models import load_tokenizer as load_model_tokenizer
from .config import TrainingConfig
from .data import DataStats, read_preference_rows, tokenize_pairs
from .task import GradedTask

logger = logging.getLogger("vrpo")


def _needs(task: GradedTask | None, what: str, flag: str) -> GradedTask:
    if task is None:
        raise ValueError(f"no {flag} and no task to take {what} from: pass {flag}")
    return task


# --- 1. the tokenizer ---------------------------------------------------------------------------


def load_run_tokenizer(cfg: TrainingConfig, task: GradedTask | None = None):
    """The run's tokenizer, with a mask token (raises ValueError naming the directory otherwise)."""
    if cfg.model_name_or_path is None and cfg.tokenizer_name_or_path is None:
        return _needs(task, "a tokenizer", "--model_name_or_path").tokenizer()
    path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    try:
        return load_model_tokenizer(path)
    except ValueError as e:
        raise ValueError(f"tokenizer at {path}: {e}") from e
    except OSError as e:
        raise FileNotFoundError(f"no tokenizer could be loaded from {path}: {e}") from e


def mask_token_id(cfg: TrainingConfig, tokenizer) -> int:
    """``--mask_token_id``, else the tokenizer's mask token."""
    if cfg.mask_token_id is not None:
        return cfg.mask_token_id
    return get_mask_token_id(tokenizer)


# --- 2. the data --------------------------------------------------------------------------------


def load_pairs(cfg: TrainingConfig, tokenizer, task: GradedTask | None = None):
    """``(train, eval, stats)``: tokenized pairs (``--dataset``, else the task's); eval is ``--eval_dataset``
    or split off the training data."""
    stats = DataStats()
    path = cfg.dataset or _needs(task, "pairs", "--dataset").pairs_path()
    rows = read_preference_rows(path, on_bad_rows=cfg.on_bad_rows, stats=stats)
    pairs = tokenize_pairs(rows, tokenizer, cfg.max_length, cfg.truncation, stats, on_bad_rows=cfg.on_bad_rows)
    result = {"train": stats.as_dict()}
    if cfg.eval_dataset:
        eval_stats = DataStats()
        eval_rows = read_preference_rows(cfg.eval_dataset, on_bad_rows=cfg.on_bad_rows, stats=eval_stats)
        eval_pairs = tokenize_pairs(
            eval_rows, tokenizer, cfg.max_length, cfg.truncation, eval_stats, on_bad_rows=cfg.on_bad_rows
        )
        result["eval"] = eval_stats.as_dict()
        return pairs, eval_pairs, result
    n_eval = min(cfg.eval_size, len(pairs) // 5)
    if n_eval < cfg.eval_size:
        logger.warning(
            "holding out %d pairs for evaluation (--eval_size %d is over a fifth of the data)", n_eval, cfg.eval_size
        )
    # A seeded split, so the held-out pairs are the same on every process and every resume.
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(pairs), generator=g).tolist()
    eval_pairs = pairs.subset(sorted(perm[:n_eval])) if n_eval else None
    train_pairs = pairs.subset(sorted(perm[n_eval:])) if n_eval else pairs
    result["eval_size"] = n_eval
    if cfg.max_train_pairs is not None and cfg.max_train_pairs < len(train_pairs):
        # Seeded like the split, on its own stream: the same subset on every process and every resume.
        g = torch.Generator().manual_seed(draw_key(cfg.seed, "max_train_pairs"))
        keep = torch.randperm(len(train_pairs), generator=g)[: cfg.max_train_pairs]
        train_pairs = train_pairs.subset(sorted(keep.tolist()))
        result["max_train_pairs"] = cfg.max_train_pairs
    return train_pairs, eval_pairs, result


# --- 3. the models ------------------------------------------------------------------------------


def _dtype(cfg: TrainingConfig):
    return None if cfg.torch_dtype == "auto" else DTYPES[cfg.torch_dtype]


def attention_backend(cfg: TrainingConfig) -> str:
    """The attention backend of a run: --attn_implementation, else vrpo_triton on CUDA, sdpa on CPU."""
    if cfg.attn_implementation:
        return cfg.attn_implementation
    return "vrpo_triton" if torch.cuda.is_available() and triton_available() else "sdpa"


def load_policy(cfg: TrainingConfig, task: GradedTask | None = None):
    """The model to train: a checkpoint of any supported family (recognised from its config.json by
    :func:`vrpo.models.load_mdm`), ``--model_name_or_path`` or the task's."""
    path = cfg.model_name_or_path or _needs(task, "a model", "--model_name_or_path").model_path()
    return load_mdm(
        path, dtype=_dtype(cfg), attn_implementation=attention_backend(cfg), mask_token_id=cfg.mask_token_id
    )


def load_reference(cfg: TrainingConfig, policy):
    """The frozen reference: ``--ref_model_name_or_path``, or a copy of the initial policy."""
    if cfg.ref_model_name_or_path:
        ref = load_mdm(
            cfg.ref_model_name_or_path,
            dtype=_dtype(cfg),
            attn_implementation=attention_backend(cfg),
            mask_token_id=cfg.mask_token_id,
        )
    else:
        ref = copy.deepcopy(policy)
    return ref.eval().requires_grad_(False)


def elbo_module(model, cfg: TrainingConfig, mask_token_id: int) -> ELBOModule:
    """``model`` wrapped so that its forward returns the run's ELBO terms (head, kernels, packing)."""
    pack_length = cfg.max_length if cfg.packing else None
    return ELBOModule(model, mask_token_id, cfg.head_options(), pack_length=pack_length)


def model_family(model, tokenizer):
    """The model's family (:func:`vrpo.models.family_of`, read from the model); ``ValueError`` when it has
    none, or when the tokenizer is another family's (its chat template and end-of-turn token would not be
    the ones the model was trained with)."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a model of a known family; load it with vrpo.models.load_mdm")
    tok_family = family_of_tokenizer(tokenizer)
    if tok_family is not None and tok_family is not family:
        raise ValueError(
            f"the tokenizer is {tok_family.display_name}'s but the model is {family.display_name}'s; "
            "pass --tokenizer_name_or_path with the model's own tokenizer"
        )
    return family


def add_lora(cfg: TrainingConfig, policy):
    """Wrap the policy with LoRA adapters (peft); the base weights are frozen."""
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
    )
    return get_peft_model(policy, lora)


@dataclass
class Models:
    """The run's models. ``reference`` is None with LoRA (the policy with its adapters off is the
    reference) and when the loss never reads a copy of the initial policy (GRPO without a KL term);
    ``reference_is_initial_policy`` says whether the reference equals the policy as loaded
    (a copy of it, or LoRA), so that terms computed with the initial policy can stand for it."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    reference_is_initial_policy: bool


def load_models(cfg: TrainingConfig, task: GradedTask | None = None, policy=None, reference=None) -> Models:
    """The policy (loaded unless given; with LoRA adapters and gradient checkpointing as configured,
    in training mode) and its frozen reference (given, ``--ref_model_name_or_path``, or a copy)."""
    policy = policy if policy is not None else load_policy(cfg, task)
    # LoRA's reference is the policy with its adapters off, whatever --ref_model_name_or_path says.
    initial = reference is None and (cfg.use_lora or not cfg.ref_model_name_or_path)
    if reference is None and not cfg.use_lora and (cfg.ref_model_name_or_path or cfg.reference_in_loss):
        reference = load_reference(cfg, policy)  # a reference model given is kept for the evaluation
    if cfg.use_lora:
        policy = add_lora(cfg, policy)
    if cfg.gradient_checkpointing:
        # transformers renamed it; the checkpoint kwargs come first under both names
        enable = getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    policy.train()
    return Models(policy, reference, initial)
