"""A run's settings, parsed from the command line and/or a YAML file.

The settings every algorithm shares are :class:`TrainingConfig`'s, in groups (one small dataclass each, one
``--help`` section each): model, data, estimator, optimisation, run. An algorithm's config adds its own group
on top: :class:`VRPOConfig` (preference: ``--algorithm vrpo`` or ``naive_dpo``) and :class:`GRPOConfig`
(online RL: ``--algorithm grpo``). :func:`parse_config` reads ``--algorithm`` first and parses the rest into
that algorithm's config, so ``--help`` lists the settings of the algorithm asked for (TRL's split: one config
per trainer, ``DPOConfig`` and ``GRPOConfig`` on shared training arguments), and a flag of another
algorithm is refused by name. ``--naive_dpo`` is a command-line alias of ``--algorithm naive_dpo``.

Each setting is declared once, as a field with its help text and metadata (:func:`setting`): its bounds or
choices, the paper's value for a field left at ``None`` (the LLaDA 1.5 recipe, Zhu et al. 2025, Section 4 and
Appendix B), and whether it defines the run (resuming with another value is refused). Validation
(:func:`validate`), the presets (:meth:`TrainingConfig.resolved`) and the resume check
(:func:`run_defining`) all read that metadata.

A run with no ``--model_name_or_path`` or no ``--dataset`` uses its task's (:mod:`vrpo.training.task`; the
command line's is ``--task``, long sorting by default), and the task's presets fill the fields left at
``None``."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser, SchedulerType
from transformers.hf_argparser import string_to_bool

from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES

from ..estimator import ESTIMATORS, LIKELIHOODS, LOSS_TYPES, SCALE_REWARDS, HeadOptions, SamplingPlan
from ..estimator.elbo import IMPLS

_REWARD_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def setting(
    help: str,
    *,
    bounds: tuple[float, float, bool, bool] | None = None,
    minimum: int | None = None,
    choices: tuple | None = None,
    paper=None,
    run: bool = False,
    **kw,
):
    """A config field with its metadata.

    Args:
        help: the ``--help`` text.
        bounds: a float's ``(low, high, low included, high included)``.
        minimum: an integer's lowest value.
        choices: the allowed values.
        paper: the value a ``None`` default resolves to for a real checkpoint (the paper's recipe).
        run: the setting defines the run (its maths or data order): resuming with another value is refused.
        kw: ``default=`` or ``default_factory=``.
    """
    meta = {"help": help, "bounds": bounds, "minimum": minimum, "choices": choices, "paper": paper, "run": run}
    return field(metadata=meta, **kw)


@dataclass
class ModelSettings:
    """The policy and reference checkpoints, their precision, and LoRA."""

    GROUP = "model"

    task: str = setting(
        "The task plug-in (vrpo/tasks/) whose model, pairs, presets and verifier a run uses where it names "
        "no --model_name_or_path or --dataset: sort_long (the default: sorting 8 to 16 digits, pairs whose "
        "chosen answer is mostly not exactly right, where VRPO beat SFT on the chosen answers and naive DPO) or "
        "sort (3 to 6 digits, always-right chosen answers: the short-answer regime). Chosen by the entry points "
        "(vrpo.tasks.TASKS).",
        default="sort_long",
    )
    model_name_or_path: str | None = setting(
        "Local checkpoint directory of a supported model family: LLaDA (model_type llada, or a Llama export) "
        "or Dream (model_type Dream, or a Qwen2 export), recognised from its config.json; adding a family is "
        "one entry in vrpo/models/families.py (README: Adding a model family). Omitted: the task's model (the "
        "command line's task: a bundled tiny sorting LLaDA, a CPU demo that trains in minutes, with its own presets).",  # noqa: E501
        default=None,
        run=True,
    )
    ref_model_name_or_path: str | None = setting(
        "Reference model directory. Default: a frozen copy of the initial policy.", default=None, run=True
    )
    tokenizer_name_or_path: str | None = setting("Tokenizer directory. Default: the model directory.", default=None)
    mask_token_id: int | None = setting(
        "Mask token id. Default: the tokenizer's mask token (LLaDA: 126336, Dream: 151666).", default=None, minimum=0
    )
    attn_implementation: str | None = setting(
        "Attention backend: sdpa, eager, flash_attention_2 or vrpo_triton. Default: vrpo_triton on CUDA, sdpa on CPU.",
        default=None,
    )
    torch_dtype: str = setting(
        "Weights dtype: auto (the checkpoint's), float32, bfloat16 or float16.",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        run=True,
    )
    mixed_precision: str | None = setting(
        "no, bf16 or fp16 autocast (accelerate). Default: accelerate's config or environment.",
        default=None,
        choices=(None, "no", "bf16", "fp16"),
        run=True,
    )
    gradient_checkpointing: bool = setting("Recompute activations in backward to save memory.", default=False)
    use_lora: bool = setting(
        "Train LoRA adapters (peft); the reference is then the same model with adapters disabled, so no "
        "second copy of the weights is held.",
        default=False,
        run=True,
    )
    lora_r: int = setting("LoRA rank.", default=16, minimum=1, run=True)
    lora_alpha: int = setting("LoRA alpha.", default=32, minimum=1, run=True)
    lora_dropout: float = setting("LoRA dropout.", default=0.0, bounds=(0.0, 1.0, True, False), run=True)
    lora_target_modules: list[str] = setting(
        "Modules that get LoRA adapters.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


@dataclass
class DataSettings:
    """The preference pairs (whose prompts GRPO answers), the held-out split, and lengths."""

    GROUP = "data"

    dataset: str | None = setting(
        "Preference data in TRL's format (prompt/chosen/rejected, strings or message lists): a .jsonl/.json "
        "or .parquet file, or a directory written by datasets' save_to_disk. Omitted: the task's pairs (the "
        "command line's task: the sorting demo, graded by its verifier).",
        default=None,
    )
    eval_dataset: str | None = setting(
        "Held-out pairs for preference accuracy. Default: --eval_size pairs split off the training data.",
        default=None,
    )
    eval_size: int | None = setting(
        "Pairs held out of --dataset for evaluation when no --eval_dataset is given (0: none). Default: 256.",
        default=None,
        minimum=0,
        paper=256,
    )
    max_length: int | None = setting(
        "Maximum tokens of prompt + response (and the row length with --packing). Default: 4096.",
        default=None,
        minimum=4,
        paper=4096,
        run=True,
    )
    truncation: str = setting(
        "Pairs longer than max_length: 'skip' (drop the pair, counted in the logs), 'truncate' (the prompt "
        "from the left, then the response from the right) or 'error'.",
        default="skip",
        choices=("truncate", "skip", "error"),
        run=True,
    )
    on_bad_rows: str = setting(
        "Malformed rows (bad JSON or UTF-8, missing fields, wrong types, empty text, unknown roles): 'error' "
        "stops with the file and line, 'skip' drops them and counts them in the logs.",
        default="error",
        choices=("error", "skip"),
    )
    max_train_pairs: int | None = setting(
        "Train on at most this many pairs (a seeded subset of the training split, after the held-out split): "
        "the data-limited regime of benchmarks/budget.py. Default: all of them.",
        default=None,
        minimum=1,
        run=True,
    )
    packing: bool = setting(
        "Pack the masked samples of several sequences into rows of max_length tokens, with attention "
        "blocked across samples (the paper packs to 4096).",
        default=False,
        run=True,
    )


@dataclass
class EstimatorSettings:
    """The ELBO estimate of log pi(y|x) and its variance reductions (LLaDA 1.5, Section 3)."""

    GROUP = "estimator"

    n_t: int = setting(
        "Timesteps (noise levels) per response: the paper's budget n with n_yt = 1.", default=8, minimum=1, run=True
    )
    n_yt: int = setting(
        "Masks per timestep (the paper: 1 is optimal at a fixed budget).", default=1, minimum=1, run=True
    )
    antithetic: bool = setting(
        "Feed the policy and the reference the same masks (antithetic sampling). --no_antithetic for the ablation.",
        default=True,
        run=True,
    )
    estimator: str = setting(
        "ELBO estimator: l_uniform (the paper's, lower variance) or t_bernoulli.",
        default="l_uniform",
        choices=ESTIMATORS,
        run=True,
    )
    stratified: bool = setting(
        "Stratify the n_t levels of a response (unbiased, lower variance).", default=False, run=True
    )
    t_floor: float = setting(
        "t_bernoulli only: LLaDA's floor eps on the mask probability (biased when > 0).",
        default=0.0,
        bounds=(0.0, 1.0, True, False),
        run=True,
    )


@dataclass
class OptimizationSettings:
    """AdamW, the schedule, batch sizes, and the head's kernel."""

    GROUP = "optimisation"

    learning_rate: float | None = setting(
        "Peak learning rate. Default: 5e-7.", default=None, bounds=(0.0, math.inf, False, False), paper=5e-7, run=True
    )
    warmup_steps: int = setting("Linear warm-up steps before the schedule.", default=15, minimum=0, run=True)
    lr_scheduler_type: str = setting(
        "transformers scheduler name (cosine, linear, constant, ...).", default="cosine", run=True
    )
    weight_decay: float = setting("AdamW weight decay.", default=0.01, bounds=(0.0, math.inf, True, False), run=True)
    adam_beta1: float = setting("AdamW beta1.", default=0.9, bounds=(0.0, 1.0, True, False), run=True)
    adam_beta2: float = setting("AdamW beta2.", default=0.95, bounds=(0.0, 1.0, True, False), run=True)
    adam_epsilon: float = setting("AdamW epsilon.", default=1e-8, bounds=(0.0, math.inf, False, False), run=True)
    max_grad_norm: float = setting(
        "Gradient clipping norm (0: off).", default=1.0, bounds=(0.0, math.inf, True, False), run=True
    )
    per_device_train_batch_size: int | None = setting(
        "Pairs per device per micro-batch. Default: 1.", default=None, minimum=1, paper=1, run=True
    )
    gradient_accumulation_steps: int = setting(
        "Micro-batches per optimizer step. Global batch = per-device batch x processes x this (paper: 64).",
        default=1,
        minimum=1,
        run=True,
    )
    num_train_epochs: int = setting("Epochs when --max_steps is -1.", default=1, minimum=1, run=True)
    max_steps: int | None = setting(
        "Optimizer steps (-1: one pass per epoch). Default: -1.", default=None, paper=-1, run=True
    )
    max_nonfinite_steps: int = setting(
        "Stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped).",
        default=5,
        minimum=1,
    )
    fused_head: bool = setting(
        "Compute log-probs with the fused masked linear cross-entropy (never materialises [tokens, vocab]).",
        default=True,
    )
    kernel_impl: str = setting("Kernel implementation: auto, triton, torch or eager.", default="auto", choices=IMPLS)
    ce_max_buffer_mb: int = setting(
        "Memory budget (MiB) of the fused masked cross-entropy's largest intermediate (its fp32 logits buffer). "
        "It trades memory for compute: on the torch path, masked tokens' logits that exceed it "
        "are recomputed in the backward (one extra GEMM over the head) instead of kept from the forward; the "
        "Triton backward runs in row chunks of this size.",
        default=DEFAULT_MAX_BUFFER_BYTES >> 20,
        minimum=1,
    )


@dataclass
class RunSettings:
    """The output directory, seed, logging, evaluation, checkpoints and generation."""

    GROUP = "run"

    output_dir: str | None = setting(
        "Where logs, checkpoints and the final model go. Default: outputs/vrpo-<time>.", default=None
    )
    overwrite_output_dir: bool = setting(
        "Start a new run in an output directory that holds an earlier vrpo run: the earlier run is first moved to "
        "<output_dir>.old-<time>. A directory of other files is refused even with this flag (never deleted).",
        default=False,
    )
    allow_config_change: bool = setting(
        "Resume although settings that change the maths or the data order (n_t, estimator, seed, batch sizes, "
        "learning rate, the data's content, ...) differ from the checkpoint's; the new values are used.",
        default=False,
    )
    seed: int = setting("Seed of the data order, the held-out split and the masks.", default=42, minimum=0, run=True)
    logging_steps: int | None = setting("Log every N steps. Default: 10.", default=None, minimum=1, paper=10)
    eval_steps: int | None = setting(
        "Evaluate preference accuracy every N steps (0: only before and after).", default=None, minimum=0, paper=0
    )
    eval_n_t: int = setting("ELBO budget (stratified timesteps) for evaluation.", default=16, minimum=1, run=True)
    save_steps: int | None = setting(
        "Checkpoint every N steps (0: only at the end). Default: 500.", default=None, minimum=0, paper=500
    )
    save_total_limit: int = setting("Checkpoints kept (the oldest are deleted).", default=2, minimum=1)
    resume_from_checkpoint: str | None = setting(
        "Resume from a checkpoint directory, or 'latest' for the newest one in --output_dir.", default=None
    )
    report_to: str = setting(
        "tensorboard or none. JSONL logs are always written.", default="tensorboard", choices=("tensorboard", "none")
    )
    num_samples: int = setting(
        "Prompts to generate answers for at the end (0: none): held-out pairs' prompts, or the bundled task's "
        "graded test prompts.",
        default=4,
        minimum=0,
    )
    gen_eval_prompts: int | None = setting(
        "How many of the task's fixed test prompts are answered greedily and graded before and after training "
        "(the first N; fewer for a quicker run, not for a reported figure). Default: all of them (the sorting "
        "demo: 1024).",
        default=None,
        minimum=1,
        run=True,
    )
    gen_eval_split: str = setting(
        "Which of the task's fixed prompt sets --gen_eval_prompts grades: 'test' (the held-out test prompts, for "
        "reported figures) or 'dev' (the task's dev prompts, for choosing settings without seeing the test ones).",
        default="test",
        choices=("test", "dev"),
        run=True,
    )
    gen_length: int | None = setting(
        "Tokens generated per sample (and per GRPO rollout), with the sampler of the model's family (LLaDA's "
        "low-confidence remasking, Dream's 'origin'). Default: 128 (rollouts on the task's prompts: the "
        "task's answer length).",
        default=None,
        minimum=1,
    )
    gen_steps: int | None = setting(
        "Denoising steps for generation and rollouts. Default: gen_length.", default=None, minimum=1
    )
    block_length: int | None = setting(
        "Semi-autoregressive block length for generation and rollouts. Default: gen_length.", default=None, minimum=1
    )


@dataclass
class TrainingConfig(RunSettings, OptimizationSettings, EstimatorSettings, DataSettings, ModelSettings):
    """The settings every algorithm shares (the ELBO-based loop's): model, data, estimator, optimisation, run.

    An algorithm's config adds its own group on top (:class:`VRPOConfig`, :class:`GRPOConfig`); its
    ``algorithm`` field's choices name the algorithms it configures. Every field is a command-line flag
    ``--name``."""

    def __post_init__(self):
        validate(self)

    @property
    def implicit_reward_beta(self) -> float:
        """The KL weight that scales the implicit reward beta * log(pi / pi_ref) reported by the held-out
        evaluation (the optimum of a KL-regularised objective with weight beta: DPO, Rafailov et al. 2023,
        Eq. 5)."""
        raise NotImplementedError

    @property
    def reference_in_loss(self) -> bool:
        """Whether the loss reads the reference's terms (else a copy of the initial policy is not loaded)."""
        return True

    def preset_note(self, task_name: str, presets: Mapping[str, object]) -> str | None:
        """Which of a task's presets :meth:`resolved` fills in, and why; None when none do."""
        names = {f.name for f in dataclasses.fields(self)}
        applied = [
            f"{name}={value}" for name, value in presets.items() if name in names and getattr(self, name) is None
        ]
        if not applied:
            return None
        why = f"no --model_name_or_path: the {task_name} task's model uses its presets"
        if self.dataset is not None:
            why += f" (sized for that task, not for --dataset {self.dataset})"
        return f"{why}: {', '.join(applied)}; pass a flag to override one"

    def resolved(self, presets: Mapping[str, object] | None = None):
        """A copy with every ``None`` default filled in: from ``presets`` (a task's, for its own model) where
        they name the field, else the paper's value."""
        presets = presets or {}
        changes = {}
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.metadata.get("paper") is not None:
                changes[f.name] = presets.get(f.name, f.metadata["paper"])
        if self.output_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            changes["output_dir"] = f"outputs/vrpo-{'demo-' if presets else ''}{stamp}"
        return dataclasses.replace(self, **changes)

    def sampling_plan(self) -> SamplingPlan:
        """The training draws' plan (LLaDA 1.5, Section 3: budget, allocation, antithetic sampling)."""
        return SamplingPlan(
            n_t=self.n_t,
            n_yt=self.n_yt,
            estimator=self.estimator,
            antithetic=self.antithetic,
            stratified=self.stratified,
            t_floor=self.t_floor,
        )

    def head_options(self) -> HeadOptions:
        """How the ELBO computes log-probabilities at the head (fused or not, the kernel, its memory budget)."""
        return HeadOptions(
            fused="auto" if self.fused_head else False,
            impl=self.kernel_impl,
            max_buffer_bytes=self.ce_max_buffer_mb << 20,
        )


@dataclass
class PreferenceSettings:
    """Offline preference optimisation: the DPO loss of LLaDA 1.5 (Eq. 7) on ELBO estimates."""

    GROUP = "preference (--algorithm vrpo, naive_dpo)"

    algorithm: str = setting(
        "vrpo (offline preference optimisation on the pairs), naive_dpo (DPO with one independent mask per "
        "sequence, for comparison; --naive_dpo is an alias) or grpo (online RL on the pairs' prompts, with "
        "its own settings: `--algorithm grpo --help`).",
        default="vrpo",
        choices=("vrpo", "naive_dpo"),
        run=True,
    )
    beta: float = setting(
        "DPO beta (vrpo, naive_dpo): the strength of the KL regularisation. GRPO's KL weight is --kl_beta.",
        default=0.2,
        bounds=(0.0, math.inf, False, False),
        run=True,
    )
    loss_type: str = setting("sigmoid (DPO), ipo, hinge or robust.", default="sigmoid", choices=LOSS_TYPES, run=True)
    label_smoothing: float = setting(
        "Label smoothing for sigmoid/robust, in [0, 0.5).", default=0.0, bounds=(0.0, 0.5, True, False), run=True
    )
    pref_weight: float = setting(
        "Weight of the preference (VRPO/DPO) loss; 0 trains the SFT term alone (benchmarks/budget.py's SFT "
        "arms), at the same forward passes.",
        default=1.0,
        bounds=(0.0, math.inf, True, False),
        run=True,
    )
    sft_weight: float | None = setting(
        "Weight of the masked-diffusion SFT loss on the chosen response. Default: 0.05.",
        default=None,
        bounds=(0.0, math.inf, True, False),
        paper=0.05,
        run=True,
    )
    precompute_ref: bool = setting(
        "Compute the reference ELBO terms for the exact seeded draws training will use in one pass before "
        "training, then free the reference model.",
        default=False,
        run=True,
    )


@dataclass
class VRPOConfig(TrainingConfig, PreferenceSettings):
    """The settings of a VRPO (or naive DPO) run: :class:`TrainingConfig`'s and the preference group."""

    def __post_init__(self):
        if self.algorithm == "grpo":
            raise ValueError(
                "--algorithm grpo has its own settings: use GRPOConfig (VRPOConfig is --algorithm vrpo or naive_dpo)"
            )
        super().__post_init__()
        if self.precompute_ref and self.use_lora:
            raise ValueError("--precompute_ref and --use_lora do not combine: with LoRA the reference costs no memory")

    @property
    def implicit_reward_beta(self) -> float:
        return self.beta

    def resolved(self, presets: Mapping[str, object] | None = None) -> VRPOConfig:
        out = super().resolved(presets)
        if out.algorithm == "naive_dpo":  # one independent mask per sequence
            out.n_t, out.n_yt, out.antithetic = 1, 1, False
        return out


@dataclass
class OnlineSettings:
    """Online RL: GRPO on ELBO ratios (the policy answers the pairs' prompts, a reward scores the answers)."""

    GROUP = "online RL (--algorithm grpo)"

    algorithm: str = setting(
        "grpo (online RL: the policy answers the pairs' prompts, a verifier or --reward_fn scores the "
        "answers). vrpo and naive_dpo have their own settings (`--help` without --algorithm grpo).",
        default="grpo",
        choices=("grpo",),
        run=True,
    )
    num_generations: int = setting(
        "GRPO: completions sampled per prompt (the group G); --per_device_train_batch_size counts prompts.",
        default=8,
        minimum=2,
        run=True,
    )
    epsilon: float = setting(
        "GRPO: PPO clip range of the ELBO ratio, in (0, 1).", default=0.2, bounds=(0.0, 1.0, False, False), run=True
    )
    kl_beta: float = setting(
        "GRPO: weight of the KL to the reference, estimated on the policy's masks (0: no reference forward, as "
        "Dr. GRPO and DAPO). Separate from --beta, DPO's, whose 0.2 default is a different quantity.",
        default=0.0,
        bounds=(0.0, math.inf, True, False),
        run=True,
    )
    num_iterations: int = setting(
        "GRPO: optimizer steps per batch of rollouts; > 1 reuses them with the rollout policy's ELBO terms "
        "stored on the same masks.",
        default=1,
        minimum=1,
        run=True,
    )
    scale_rewards: str = setting(
        "GRPO: 'group' divides the group-centred rewards by the group's std (GRPO); 'none' does not (Dr. GRPO).",
        default="group",
        choices=SCALE_REWARDS,
        run=True,
    )
    likelihood: str = setting(
        "GRPO: the estimate of log pi(y|x) in the ratio and the KL: 'elbo' (the n_t-sample ELBO, the same masks for "
        "every policy) or 'one_step' (d1's: one forward with the whole response and 15%% of the prompt masked; "
        "a different quantity, for ablations; --n_t is not used).",
        default="elbo",
        choices=LIKELIHOODS,
        run=True,
    )
    temperature: float = setting(
        "GRPO: rollout sampling temperature (0: greedy).", default=1.0, bounds=(0.0, math.inf, True, False), run=True
    )
    reward_fn: str | None = setting(
        "GRPO: a reward function 'module:function' called as function(prompts, completions) -> list of "
        "floats (TRL's convention, strings in and out). Default: the task's verifier.",
        default=None,
        run=True,
    )


@dataclass
class GRPOConfig(TrainingConfig, OnlineSettings):
    """The settings of a GRPO run: :class:`TrainingConfig`'s and the online RL group."""

    precompute_ref = False  # not a setting: rollouts are not known in advance (read by the memory planner)

    def __post_init__(self):
        super().__post_init__()
        if self.reward_fn is not None and not _REWARD_FN.match(self.reward_fn):
            raise ValueError(f"--reward_fn must be 'module:function', got {self.reward_fn!r}")

    @property
    def implicit_reward_beta(self) -> float:
        return self.kl_beta

    @property
    def reference_in_loss(self) -> bool:
        return self.kl_beta > 0


CONFIGS = (VRPOConfig, GRPOConfig)  # each configures the algorithms its ``algorithm`` field allows
ALGORITHMS = tuple(a for c in CONFIGS for a in c.__dataclass_fields__["algorithm"].metadata["choices"])


def config_class(algorithm: str) -> type[TrainingConfig]:
    """The config of ``algorithm`` (``ValueError`` naming --algorithm when none configures it)."""
    for cls in CONFIGS:
        if algorithm in cls.__dataclass_fields__["algorithm"].metadata["choices"]:
            return cls
    raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def run_defining(cfg: TrainingConfig) -> dict:
    """The settings that define a run (``run=True`` in their metadata), by name."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("run")}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_float(name: str, value, low: float, high: float, low_ok: bool, high_ok: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--{name} must be a number, got {value!r}")
    above = value >= low if low_ok else value > low
    below = value <= high if high_ok else value < high
    if not (math.isfinite(value) and above and below):
        if high == math.inf:
            want = f"{'>=' if low_ok else '>'} {low:g} and finite"
        else:
            want = f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        raise ValueError(f"--{name} must be {want}, got {value!r}")


def _check_count(name: str, value, lowest: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        kind = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
        raise ValueError(f"--{name} must be {kind}, got {value!r}")


def _check_choice(name: str, value, choices: tuple):
    if value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ValueError(f"--{name} must be one of {shown}, got {value!r}")


def _check_local_dir(name: str, path: str):
    """A model or tokenizer path is a local directory: never a silent download attempt."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    if name == "model_name_or_path" and os.path.basename(path) == "config.json" and os.path.isfile(path):
        return  # a model's config alone: enough for `python -m vrpo.plan`; loading weights names it later
    if os.path.exists(path):
        raise ValueError(f"--{name} {path}: not a directory (expected a checkpoint directory)")
    if _HUB_ID.match(path):
        local = path.rsplit("/", 1)[1]
        raise ValueError(
            f"--{name} {path}: no such local directory. vrpo reads local checkpoints only; to use the hub model "
            f"{path}, download it first (`hf download {path} --local-dir {local}`) and pass --{name} {local}"
        )
    raise ValueError(f"--{name} {path}: no such directory")


def _check_field(f: dataclasses.Field, value):
    meta = f.metadata
    if meta.get("choices") is not None:
        _check_choice(f.name, value, meta["choices"])
    if value is None:  # resolved later
        return
    if meta.get("bounds") is not None:
        _check_float(f.name, value, *meta["bounds"])
    if meta.get("minimum") is not None:
        _check_count(f.name, value, meta["minimum"])


def validate(cfg: TrainingConfig):
    """Raise ``ValueError`` naming the flag for the first setting out of range (argparse reports it)."""
    for f in dataclasses.fields(cfg):
        _check_field(f, getattr(cfg, f.name))
    if cfg.seed >= 2**63:
        raise ValueError(f"--seed must be below 2**63, got {cfg.seed}")
    if cfg.max_steps is not None and (
        isinstance(cfg.max_steps, bool) or not (cfg.max_steps == -1 or cfg.max_steps >= 1)
    ):
        raise ValueError(f"--max_steps must be -1 (one pass per epoch) or a positive integer, got {cfg.max_steps!r}")
    _check_choice("lr_scheduler_type", cfg.lr_scheduler_type, tuple(t.value for t in SchedulerType))
    for name in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        if getattr(cfg, name) is not None:
            _check_local_dir(name, getattr(cfg, name))


PROG = "python -m vrpo.train"  # the usage line and the one prefix of every CLI error
DESCRIPTION = (
    "VRPO preference optimization (or online RL with --algorithm grpo) of a masked diffusion LM "
    "(LLaDA, Dream). Every setting below can also come from a YAML file (--config); flags given "
    "after it override it. The settings listed are --algorithm's (vrpo unless given): `--algorithm "
    "grpo --help` lists GRPO's."
)
NAIVE_DPO_ALIAS = "Alias of --algorithm naive_dpo: n_t = n_yt = 1 and no antithetic sampling (for comparison)."


class _SettingsParser(HfArgumentParser):
    """transformers' dataclass parser, with one ``--help`` group per settings class (model, data, estimator,
    optimisation, run, and the algorithm's), each field showing only its help (the rest of
    :func:`setting`'s metadata is vrpo's, and argparse would take it for keyword arguments)."""

    def _add_dataclass_arguments(self, dtype):
        hints = typing.get_type_hints(dtype)
        for cls in reversed(dtype.__mro__):
            if "GROUP" not in vars(cls):
                continue
            group = self.add_argument_group(cls.GROUP, cls.__doc__)
            for f in dataclasses.fields(cls):
                f.type = hints[f.name]
                self._parse_dataclass_field(group, f)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        plain = copy.copy(field)
        plain.metadata = types.MappingProxyType({"help": field.metadata["help"]})
        HfArgumentParser._parse_dataclass_field(parser, plain)


def _tidy_help(parser: argparse.ArgumentParser):
    """One default per flag (a help text that states its own default keeps it; others get argparse's), and
    the ``--no_<flag>`` switches say what they turn off instead of repeating the flag's help."""
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        name = action.option_strings[0]
        if name.startswith("--no_"):
            action.help = f"Turn off --{name[len('--no_') :]} (on by default)."
        elif "Default" not in action.help and action.default not in (None, False, argparse.SUPPRESS):
            action.help = f"{action.help} (default: {action.default})"


def _yaml_flags(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], dict]:
    """``argv`` without ``--config FILE``, and the file's ``field: value`` pairs (empty without one)."""
    if "--config" not in argv:
        return argv, {}
    i = argv.index("--config")
    if i + 1 >= len(argv):
        parser.error("--config needs a YAML file path")
    path = argv[i + 1]
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML: {e}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    return argv[:i] + argv[i + 2 :], {"path": path, "values": values}


def _as_flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out.append(f"--{key}")
        out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out


def _algorithm(argv: list[str], parser: argparse.ArgumentParser) -> str:
    """The run's algorithm from ``--algorithm`` (the last one given) and the ``--naive_dpo`` alias."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--algorithm", default="vrpo")
    chooser.add_argument("--naive_dpo", "--naive-dpo", type=string_to_bool, nargs="?", const=True, default=False)
    try:
        given, _ = chooser.parse_known_args(argv)
    except SystemExit:
        parser.error("--naive_dpo takes true or false")
    if given.naive_dpo and given.algorithm == "grpo":
        parser.error("--naive_dpo is --algorithm naive_dpo: it does not combine with --algorithm grpo")
    return "naive_dpo" if given.naive_dpo else given.algorithm


def _elsewhere(name: str, cls: type) -> str:
    """`` (a setting of --algorithm X)`` when ``name`` is another algorithm's setting, else ``""``."""
    for other in CONFIGS:
        if other is not cls and name in other.__dataclass_fields__:
            return f" (a setting of --algorithm {' or '.join(other.__dataclass_fields__['algorithm'].metadata['choices'])})"  # noqa: E501
    return ""


def parse_config(argv: list[str] | None = None) -> TrainingConfig:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into the config of its ``--algorithm``: a
    :class:`VRPOConfig` (vrpo, the default, or naive_dpo) or a :class:`GRPOConfig`. ``--config FILE.yaml``
    supplies values that later command-line flags override. Raises ``SystemExit`` with argparse's message on
    bad flags, naming the algorithm a flag belongs to when it is another's.
    """
    errors = argparse.ArgumentParser(prog=PROG)  # reports the errors met before the algorithm is known
    argv, yaml_file = _yaml_flags(list(sys.argv[1:] if argv is None else argv), errors)
    argv = _as_flags(yaml_file.get("values", {})) + argv
    algorithm = _algorithm(argv, errors)
    try:
        cls = config_class(algorithm)
    except ValueError as e:
        errors.error(str(e))
    parser = _SettingsParser(cls, prog=PROG, description=DESCRIPTION, formatter_class=argparse.HelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs; flags override it.")
    if cls is VRPOConfig:
        parser.add_argument(
            "--naive_dpo",
            "--naive-dpo",
            type=string_to_bool,
            nargs="?",
            const=True,
            default=False,
            help=NAIVE_DPO_ALIAS,
        )
    _tidy_help(parser)
    names = {f.name for f in dataclasses.fields(cls)} | ({"naive_dpo"} if cls is VRPOConfig else set())
    if unknown := sorted(set(yaml_file.get("values", {})) - names):
        parser.error(
            f"--config {yaml_file['path']}: unknown field(s) for --algorithm {algorithm}: "
            + ", ".join(name + _elsewhere(name, cls) for name in unknown)
        )
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        flags = [a for a in rest if a.startswith("--")]
        other = next((f for f in flags if _elsewhere(f[2:].split("=")[0].replace("-", "_"), cls)), None)
        if other is not None:
            name = other[2:].split("=")[0].replace("-", "_")
            parser.error(f"{other} does not apply to --algorithm {algorithm}{_elsewhere(name, cls)}")
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    if algorithm == "naive_dpo":
        values["algorithm"] = "naive_dpo"
    try:
        return cls(**values)
    except ValueError as e:  # raised by __post_init__
        parser.error(str(e))
