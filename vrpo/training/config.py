"""``VRPOConfig``: every setting of a VRPO run, parsed from the command line and/or a YAML file.

Defaults follow the LLaDA 1.5 recipe (Zhu et al. 2025, Section 4 and Appendix B). Fields left at ``None`` are resolved by
:meth:`VRPOConfig.resolved`: the paper's value for a real checkpoint, or a CPU-sized value for the
embedded toy run (no ``--model_name_or_path``), which starts from the bundled tiny SFT model
(``python -m vrpo.toy sft``) and learns from its own answers ranked by a verifier, on the CPU in a
couple of minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import sys
from dataclasses import dataclass, field

from .losses import LOSS_TYPES
from .sampling import ESTIMATORS, SamplingPlan

# (paper / real checkpoint, embedded toy run)
PRESETS = {
    "learning_rate": (5e-7, 5e-4),
    "per_device_train_batch_size": (1, 16),
    "max_length": (4096, 64),
    "max_steps": (-1, 300),
    "save_steps": (500, 50),
    "eval_size": (256, 128),
    "logging_steps": (10, 5),
    "eval_steps": (0, 0),
    # The tiny model forgets how to write under the preference loss alone (see the README).
    "sft_weight": (0.05, 1.0),
}


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class VRPOConfig:
    """VRPO training settings. Every field is a command-line flag ``--name``."""

    # --- model ---
    model_name_or_path: str | None = _help(
        "Local checkpoint directory of a supported model family: LLaDA (model_type llada, or a Llama export) "
        "or Dream (model_type Dream, or a Qwen2 export), recognised from its config.json; adding a family is "
        "one entry in vrpo/models/families.py (README: Adding a model family). Omitted: the embedded tiny "
        "LLaDA, a CPU demo that trains in minutes.",
        default=None,
    )
    ref_model_name_or_path: str | None = _help(
        "Reference model directory. Default: a frozen copy of the initial policy.", default=None
    )
    tokenizer_name_or_path: str | None = _help("Tokenizer directory. Default: the model directory.", default=None)
    mask_token_id: int | None = _help(
        "Mask token id. Default: the tokenizer's mask token (LLaDA: 126336, Dream: 151666).", default=None
    )
    attn_implementation: str | None = _help(
        "Attention backend: sdpa, eager, flash_attention_2 or vrpo_triton. Default: vrpo_triton on CUDA, "
        "sdpa on CPU.",
        default=None,
    )
    torch_dtype: str = _help("Weights dtype: auto (the checkpoint's), float32, bfloat16 or float16.", default="auto")
    mixed_precision: str | None = _help(
        "no, bf16 or fp16 autocast (accelerate). Default: accelerate's config or environment.", default=None
    )
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=False)
    use_lora: bool = _help(
        "Train LoRA adapters (peft); the reference is then the same model with adapters disabled, so no "
        "second copy of the weights is held.",
        default=False,
    )
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha.", default=32)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)
    lora_target_modules: list[str] = _help(
        "Modules that get LoRA adapters.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    precompute_ref: bool = _help(
        "Compute the reference ELBO terms for the exact seeded draws training will use in one pass before "
        "training, then free the reference model.",
        default=False,
    )

    # --- data ---
    dataset: str | None = _help(
        "Preference data in TRL's format (prompt/chosen/rejected, strings or message lists): a .jsonl/.json "
        "or .parquet file, or a directory written by datasets' save_to_disk. Omitted: the bundled toy "
        "sorting task.",
        default=None,
    )
    eval_dataset: str | None = _help(
        "Held-out pairs for preference accuracy. Default: --eval_size pairs split off the training data.",
        default=None,
    )
    eval_size: int | None = _help(
        "Pairs held out of --dataset for evaluation when no --eval_dataset is given (0: none). "
        "Default: 256 (toy run: 128).",
        default=None,
    )
    max_length: int | None = _help(
        "Maximum tokens of prompt + response (and the row length with --packing). Default: 4096 (toy: 64).",
        default=None,
    )
    truncation: str = _help(
        "Pairs longer than max_length: 'skip' (drop the pair, counted in the logs), 'truncate' (the prompt "
        "from the left, then the response from the right) or 'error'.",
        default="skip",
    )
    on_bad_rows: str = _help(
        "Malformed rows (bad JSON or UTF-8, missing fields, wrong types, empty text, unknown roles): 'error' "
        "stops with the file and line, 'skip' drops them and counts them in the logs.",
        default="error",
    )
    packing: bool = _help(
        "Pack the masked samples of several sequences into rows of max_length tokens, with attention "
        "blocked across samples (the paper packs to 4096).",
        default=False,
    )

    # --- ELBO sampling (the variance reductions) ---
    n_t: int = _help("Timesteps (noise levels) per response: the paper's budget n with n_yt = 1.", default=8)
    n_yt: int = _help("Masks per timestep (the paper: 1 is optimal at a fixed budget).", default=1)
    antithetic: bool = _help(
        "Feed the policy and the reference the same masks (antithetic sampling). --no_antithetic for the "
        "ablation.",
        default=True,
    )
    estimator: str = _help("ELBO estimator: l_uniform (the paper's, lower variance) or t_bernoulli.", default="l_uniform")
    stratified: bool = _help("Stratify the n_t levels of a response (unbiased, lower variance).", default=False)
    t_floor: float = _help("t_bernoulli only: LLaDA's floor eps on the mask probability (biased when > 0).", default=0.0)
    naive_dpo: bool = _help(
        "Naive DPO on an MDM: n_t = n_yt = 1 and no antithetic sampling (for comparison).", default=False
    )

    # --- loss ---
    beta: float = _help("DPO beta: the strength of the KL regularisation.", default=0.2)
    loss_type: str = _help("sigmoid (DPO), ipo, hinge or robust.", default="sigmoid")
    label_smoothing: float = _help("Label smoothing for sigmoid/robust, in [0, 0.5).", default=0.0)
    sft_weight: float | None = _help(
        "Weight of the masked-diffusion SFT loss on the chosen response. Default: 0.05 (toy run: 1.0).", default=None
    )

    # --- optimisation ---
    learning_rate: float | None = _help("Peak learning rate. Default: 5e-7 (toy run: 5e-4).", default=None)
    warmup_steps: int = _help("Linear warm-up steps before the schedule.", default=15)
    lr_scheduler_type: str = _help("transformers scheduler name (cosine, linear, constant, ...).", default="cosine")
    weight_decay: float = _help("AdamW weight decay.", default=0.01)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.95)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Gradient clipping norm (0: off).", default=1.0)
    per_device_train_batch_size: int | None = _help(
        "Pairs per device per micro-batch. Default: 1 (toy run: 16).", default=None
    )
    gradient_accumulation_steps: int = _help(
        "Micro-batches per optimizer step. Global batch = per-device batch x processes x this (paper: 64).",
        default=1,
    )
    num_train_epochs: int = _help("Epochs when --max_steps is -1.", default=1)
    max_steps: int | None = _help("Optimizer steps (-1: one pass per epoch). Default: -1 (toy run: 300).", default=None)
    max_nonfinite_steps: int = _help(
        "Stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped).",
        default=5,
    )
    fused_head: bool = _help(
        "Compute log-probs with the fused masked linear cross-entropy (never materialises [tokens, vocab]).",
        default=True,
    )
    kernel_impl: str = _help("Kernel implementation: auto, triton, torch or eager.", default="auto")
    ce_max_buffer_mb: int | None = _help(
        "Memory budget (MiB) of the fused masked cross-entropy's largest intermediate (its fp32 logits buffer). "
        "Default: 1024. It trades memory for compute: on the torch path, masked tokens' logits that exceed it "
        "are recomputed in the backward (one extra GEMM over the head) instead of kept from the forward; the "
        "Triton backward runs in row chunks of this size.",
        default=None,
    )

    # --- run, logging, checkpoints ---
    output_dir: str | None = _help("Where logs, checkpoints and the final model go. Default: outputs/vrpo-<time>.", default=None)
    overwrite_output_dir: bool = _help(
        "Start a new run in an output directory that holds an earlier vrpo run: the earlier run is first moved to "
        "<output_dir>.old-<time>. A directory of other files is refused even with this flag (never deleted).",
        default=False,
    )
    allow_config_change: bool = _help(
        "Resume although settings that change the maths or the data order (n_t, estimator, seed, batch sizes, "
        "learning rate, the data's content, ...) differ from the checkpoint's; the new values are used.",
        default=False,
    )
    seed: int = _help("Seed of the data order, the held-out split and the masks.", default=42)
    logging_steps: int | None = _help("Log every N steps. Default: 10 (toy run: 5).", default=None)
    eval_steps: int | None = _help("Evaluate preference accuracy every N steps (0: only before and after).", default=None)
    eval_n_t: int = _help("ELBO budget (stratified timesteps) for evaluation.", default=16)
    save_steps: int | None = _help("Checkpoint every N steps (0: only at the end). Default: 500 (toy: 50).", default=None)
    save_total_limit: int = _help("Checkpoints kept (the oldest are deleted).", default=2)
    resume_from_checkpoint: str | None = _help(
        "Resume from a checkpoint directory, or 'latest' for the newest one in --output_dir.", default=None
    )
    report_to: str = _help("tensorboard or none. JSONL logs are always written.", default="tensorboard")
    num_samples: int = _help(
        "Prompts to generate answers for at the end (0: none): held-out pairs' prompts, or the bundled task's "
        "graded test prompts.", default=4)
    gen_length: int | None = _help(
        "Tokens generated per sample, with the sampler of the model's family (LLaDA's low-confidence remasking, "
        "Dream's 'origin'). Default: 128 (toy run: the reference length).", default=None
    )
    gen_steps: int | None = _help("Denoising steps for generation. Default: gen_length.", default=None)
    block_length: int | None = _help("Semi-autoregressive block length for generation. Default: gen_length.", default=None)

    def __post_init__(self):
        validate(self)

    @property
    def toy(self) -> bool:
        """The embedded demo: no checkpoint given."""
        return self.model_name_or_path is None

    @property
    def toy_task(self) -> bool:
        """The bundled sorting task: no ``--dataset`` given (its answers can be graded)."""
        return self.dataset is None

    def preset_note(self) -> str | None:
        """Which of the embedded model's presets :meth:`resolved` fills in, and why; None when none do."""
        if not self.toy:
            return None
        applied = [f"{name}={values[1]}" for name, values in PRESETS.items() if getattr(self, name) is None]
        if not applied:
            return None
        why = "no --model_name_or_path: the bundled tiny SFT model uses its demo presets"
        if not self.toy_task:
            why += f" (sized for the bundled sorting task, not for --dataset {self.dataset})"
        return f"{why}: {', '.join(applied)}; pass a flag to override one"

    def resolved(self) -> VRPOConfig:
        """A copy with every ``None`` default filled in (paper values, or toy-run values)."""
        which = 1 if self.toy else 0
        changes = {name: values[which] for name, values in PRESETS.items() if getattr(self, name) is None}
        if self.output_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            changes["output_dir"] = f"outputs/vrpo-{'toy-' if self.toy else ''}{stamp}"
        out = dataclasses.replace(self, **changes)
        if out.naive_dpo:
            out.n_t, out.n_yt, out.antithetic = 1, 1, False
        return out

    def sampling_plan(self) -> SamplingPlan:
        return SamplingPlan(
            n_t=self.n_t,
            n_yt=self.n_yt,
            estimator=self.estimator,
            antithetic=self.antithetic,
            stratified=self.stratified,
            t_floor=self.t_floor,
        )


# Flag -> (lowest, highest, lowest included, highest included); None values are "resolve later".
_FLOAT_RANGES = {
    "beta": (0.0, math.inf, False, False),
    "learning_rate": (0.0, math.inf, False, False),
    "label_smoothing": (0.0, 0.5, True, False),
    "sft_weight": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "max_grad_norm": (0.0, math.inf, True, False),
    "adam_beta1": (0.0, 1.0, True, False),
    "adam_beta2": (0.0, 1.0, True, False),
    "adam_epsilon": (0.0, math.inf, False, False),
    "t_floor": (0.0, 1.0, True, False),
    "lora_dropout": (0.0, 1.0, True, False),
}
# Counts where 0 means something (off / none / only at the end) ...
_COUNTS_FROM_0 = ("warmup_steps", "save_steps", "eval_steps", "eval_size", "num_samples", "mask_token_id", "seed")
# ... and counts that must be at least 1.
_COUNTS_FROM_1 = ("n_t", "n_yt", "gradient_accumulation_steps", "num_train_epochs", "max_nonfinite_steps", "eval_n_t",
                  "per_device_train_batch_size", "lora_r", "lora_alpha", "logging_steps", "save_total_limit",
                  "gen_length", "gen_steps", "block_length", "ce_max_buffer_mb")
_CHOICES = {
    "loss_type": LOSS_TYPES,
    "estimator": ESTIMATORS,
    "truncation": ("truncate", "skip", "error"),
    "on_bad_rows": ("error", "skip"),
    "report_to": ("tensorboard", "none"),
    "torch_dtype": ("auto", "float32", "bfloat16", "float16"),
    "kernel_impl": ("auto", "triton", "torch", "eager"),
    "mixed_precision": (None, "no", "bf16", "fp16"),
}
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


def validate(cfg: VRPOConfig):
    """Raise ``ValueError`` naming the flag for the first setting out of range (argparse reports it)."""
    for name, bounds in _FLOAT_RANGES.items():
        if getattr(cfg, name) is not None:
            _check_float(name, getattr(cfg, name), *bounds)
    for lowest, names in ((0, _COUNTS_FROM_0), (1, _COUNTS_FROM_1)):
        for name in names:
            if getattr(cfg, name) is not None:
                _check_count(name, getattr(cfg, name), lowest)
    if cfg.seed >= 2**63:
        raise ValueError(f"--seed must be below 2**63, got {cfg.seed}")
    if cfg.max_steps is not None and (isinstance(cfg.max_steps, bool) or not (cfg.max_steps == -1 or cfg.max_steps >= 1)):
        raise ValueError(f"--max_steps must be -1 (one pass per epoch) or a positive integer, got {cfg.max_steps!r}")
    if cfg.max_length is not None and (isinstance(cfg.max_length, bool) or cfg.max_length < 4):
        raise ValueError(f"--max_length must be at least 4, got {cfg.max_length}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            shown = ", ".join(c for c in choices if c is not None)
            raise ValueError(f"--{name} must be one of {shown}, got {getattr(cfg, name)!r}")
    from transformers import SchedulerType

    if cfg.lr_scheduler_type not in {t.value for t in SchedulerType}:
        shown = ", ".join(t.value for t in SchedulerType)
        raise ValueError(f"--lr_scheduler_type must be one of {shown}, got {cfg.lr_scheduler_type!r}")
    if cfg.precompute_ref and cfg.use_lora:
        raise ValueError("--precompute_ref and --use_lora do not combine: with LoRA the reference costs no memory")
    for name in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        if getattr(cfg, name) is not None:
            _check_local_dir(name, getattr(cfg, name))


PROG = "python -m vrpo.train"  # the usage line and the one prefix of every CLI error
DESCRIPTION = ("VRPO preference optimization of a masked diffusion LM (LLaDA, Dream). Every setting below can "
               "also come from a YAML file (--config); flags given after it override it.")


def _tidy_help(parser: argparse.ArgumentParser):
    """One default per flag (a help text that states its own default keeps it; others get argparse's), and
    the ``--no_<flag>`` switches say what they turn off instead of repeating the flag's help."""
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        name = action.option_strings[0]
        if name.startswith("--no_"):
            action.help = f"Turn off --{name[len('--no_'):]} (on by default)."
        elif "Default" not in action.help and action.default not in (None, False, argparse.SUPPRESS):
            action.help = f"{action.help} (default: {action.default})"


def parse_config(argv: list[str] | None = None) -> VRPOConfig:
    """Parse ``argv`` (default: ``sys.argv[1:]``). ``--config FILE.yaml`` supplies defaults that
    later command-line flags override. Raises ``SystemExit`` with argparse's message on bad flags.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(VRPOConfig, prog=PROG, description=DESCRIPTION, formatter_class=argparse.HelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs; flags override it.")
    _tidy_help(parser)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a YAML file path")
        path = argv[i + 1]
        del argv[i : i + 2]
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            parser.error(f"--config {path}: {e.strerror}")
        except yaml.YAMLError as e:
            parser.error(f"--config {path}: not valid YAML: {e}")
        if not isinstance(values, dict):
            parser.error(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(VRPOConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {path}: unknown field(s) {', '.join(unknown)}")
        prefix = []
        for key, value in values.items():
            prefix.append(f"--{key}")
            prefix.extend(str(v) for v in value) if isinstance(value, list) else prefix.append(str(value))
        argv = prefix + argv
    try:
        config, *_ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:  # raised by __post_init__
        parser.error(str(e))
    return config
