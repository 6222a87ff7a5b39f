"""``VRPOTrainer``: the loop around the library's maths (sampling, ELBO, loss).

A run, top-down (each a method of :class:`VRPOTrainer`, in this order):

1. build (``__init__``): resolve the config; load the tokenizer, then read and tokenize the data, then
   load the models (:mod:`vrpo.loading`); the optimizer and scheduler; restore a checkpoint if resuming;
2. ``train``: evaluate the initial policy (and the reference's terms), precompute the reference if
   asked, then the loop of ``train_step``, with logging, evaluation and checkpoints;
3. ``finish``: the final evaluation, checkpoint, model, samples and ``summary.json``.

One optimizer step (``train_step``):

1. take this process's share of the step's global batch of pairs (a seeded permutation per epoch);
2. draw masks for every chosen and rejected sequence, keyed by ``(seed, epoch, pair, side)`` so a
   draw never depends on batching, padding, process count or resumption;
3. run the policy on its draws (with gradients) and the reference on the same draws (antithetic) or
   fresh ones, without gradients; chosen and rejected go through in one batch;
4. VRPO loss (+ the SFT term), backward, gradient accumulation, clipping;
5. skip the step if the learning rate, loss or gradient norm is not finite; after the update, check
   the weights (one fused norm) and roll back to the last checkpoint if they are not; stop after too
   many bad steps in a row.

Checkpoints are atomic (:mod:`vrpo.checkpoint`), and a resumed run continues bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import distributed, loading, run_dir
from .checkpoint import CheckpointError, CheckpointManager, atomic_write_text
from .config import VRPOConfig
from .elbo import ELBOModule, NonFiniteELBOError
from .losses import mdm_sft_loss, vrpo_loss
from .sampling import MaskDraw, SamplingPlan, draw_key, draw_masks_keyed
from .toy import GenerationReport, generation_metrics, graded_task

logger = logging.getLogger("vrpo")

CHOSEN, REJECTED = 0, 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# What changes the maths or the data order of a run: resuming with another value is refused
# (``--allow_config_change`` overrides; the optimizer's settings are then applied to the restored state).
RUN_DEFINING = ("model_name_or_path", "ref_model_name_or_path", "use_lora", "lora_r", "lora_alpha", "lora_dropout",
                "torch_dtype", "mixed_precision", "max_length", "truncation", "packing", "n_t", "n_yt", "antithetic",
                "estimator", "stratified", "t_floor", "beta", "loss_type", "label_smoothing", "sft_weight",
                "learning_rate", "warmup_steps", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2",
                "adam_epsilon", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps",
                "num_train_epochs", "max_steps", "seed", "eval_n_t", "precompute_ref")


def fault_point(name: str, step: int):
    """Test hook: ``VRPO_KILL_AT=<name>:<step>[:<SIGNAL>]`` sends SIGKILL (or the named signal, e.g.
    ``SIGTERM``) to this process at that point."""
    spec = os.environ.get("VRPO_KILL_AT", "")
    where, _, sig = spec.partition(":SIG")
    if spec and where == f"{name}:{step}":
        os.kill(os.getpid(), getattr(signal, "SIG" + sig) if sig else signal.SIGKILL)


def reward_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """``(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))`` from ELBO estimates [B]: the score
    without ``beta``: DPO's log-ratio margin with ELBOs in place of log-likelihoods (Zhu et al. 2025)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def records_until(path: str, step: int) -> list[str]:
    """The lines of a metrics log up to ``step``. A torn last line (the run was killed while writing it)
    is dropped; any other line that is not a JSON record is a :class:`CheckpointError` naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    kept = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                logger.warning("%s:%d: dropping a torn last line (the run stopped while writing it)", path, n)
                break
            raise CheckpointError(f"{path}:{n}: not a JSON record; repair or delete the log to resume") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}:{n}: not a JSON object; repair or delete the log to resume")
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsLogger:
    """JSONL (always) and TensorBoard (optional) logs under ``<output_dir>/logs``; main process only.

    On resume, records after the resumed step are dropped so that the log reads as one clean run.
    """

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "logs", "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            atomic_write_text(self.path, "".join(records_until(self.path, resume_step)))
        elif os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                os.path.join(output_dir, "logs", "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


@dataclass
class RunState:
    """What a run carries from step to step and through a checkpoint (``trainer_state.json``)."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    last_losses: list[float] = field(default_factory=list)  # the VRPO loss of the last applied steps
    pref_acc_before: float | None = None
    final_eval: dict | None = None  # logged before the final checkpoint: not repeated when resuming from it
    gen_acc_before: float | None = None  # graded tasks only: the initial policy's held-out generations
    gen_credit_before: float | None = None

    def to_checkpoint(self, max_steps: int, seed: int) -> dict:
        return {"step": self.step, "max_steps": max_steps, "seed": seed, "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite, "last_losses": self.last_losses,
                "pref_acc_before": self.pref_acc_before, "final_eval": self.final_eval,
                "gen_acc_before": self.gen_acc_before, "gen_credit_before": self.gen_credit_before}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        return cls(step=saved["step"], skipped_steps=saved.get("skipped_steps", 0),
                   consecutive_nonfinite=saved.get("consecutive_nonfinite", 0),
                   last_losses=saved.get("last_losses", []), pref_acc_before=saved.get("pref_acc_before"),
                   final_eval=saved.get("final_eval"), gen_acc_before=saved.get("gen_acc_before"),
                   gen_credit_before=saved.get("gen_credit_before"))


@dataclass
class LogWindow:
    """Step metrics and tokens since the last log record."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0
    t0: float = field(default_factory=time.time)

    def add(self, metrics: dict, tokens: int):
        self.tokens += tokens
        for key, v in metrics.items():
            self.metrics.setdefault(key, []).append(v)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.time() - self.t0, 1e-9)

    def record(self, skipped_steps: int) -> dict:
        """The window's means (non-finite ones left out), throughput and skips; then start a new window."""
        out = {k: sum(v) / len(v) for k, v in self.metrics.items() if v and all(math.isfinite(x) for x in v)}
        out["train/tokens_per_s"] = self.tokens_per_s()
        out["train/skipped_steps"] = skipped_steps
        self.metrics, self.tokens, self.t0 = {}, 0, time.time()
        return out


class VRPOTrainer:
    """Train a masked diffusion LM with VRPO.

    Args:
        config: the run's :class:`~vrpo.config.VRPOConfig` (``None`` fields are resolved).
        model, ref_model, tokenizer: optional objects to use instead of loading them from the config
            (the API route; the command line loads them). ``ref_model`` defaults to a frozen copy of
            the initial policy (or, with LoRA, the policy with its adapters off).
        train_pairs, eval_pairs: optional :class:`~vrpo.data.TokenizedPairs`.
    """

    # --- build the run: everything that can be wrong is found before anything is written ----------

    def __init__(self, config: VRPOConfig, model=None, ref_model=None, tokenizer=None, train_pairs=None, eval_pairs=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = cfg = config.resolved()
        self.plan = cfg.sampling_plan()
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        distributed.check_supported(self.accelerator)
        set_seed(cfg.seed)
        self.is_main = self.accelerator.is_main_process
        run_dir.check_writable(cfg.output_dir)  # before the (slow) loading, but nothing written yet
        self._report_presets(config)
        self._load_tokenizer(tokenizer)
        self._load_data(train_pairs, eval_pairs)
        self._plan_batches()
        self._open_output_dir()
        try:
            self._prepare_optimization(self._load_models(model, ref_model))
            self._restore()
        except BaseException:
            self.close()
            raise

    def close(self):
        """Release the output directory (``train`` does this when it returns or raises)."""
        if self.run_dir is not None:
            self.run_dir.close()

    def _report_presets(self, config: VRPOConfig):
        note = config.preset_note()
        if note and self.is_main:
            # A user's dataset on the embedded model gets presets made for the sorting task: say so loudly.
            logger.log(logging.INFO if config.toy_task else logging.WARNING, note)

    def _load_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer if tokenizer is not None else loading.load_tokenizer(self.config)
        self.mask_token_id = loading.mask_token_id(self.config, self.tokenizer)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _load_data(self, train_pairs, eval_pairs):
        if train_pairs is None:
            train_pairs, eval_pairs, self.data_stats = loading.load_pairs(self.config, self.tokenizer)
        else:
            self.data_stats = {}
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.task = graded_task(self.config)

    @property
    def has_eval(self) -> bool:
        return self.eval_pairs is not None and len(self.eval_pairs) > 0

    def _plan_batches(self):
        cfg = self.config
        self.local_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.global_batch = self.local_batch * self.accelerator.num_processes
        self.steps_per_epoch = len(self.train_pairs) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_pairs)} training pairs do not fill one global batch of {self.global_batch} "
                f"(per-device batch x processes x accumulation); lower --per_device_train_batch_size"
            )
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch * cfg.num_train_epochs

    def _open_output_dir(self):
        """Lock the output directory for this run (:mod:`vrpo.run_dir`: never a user's files, one run at a
        time, an overwritten run moved aside first); find the checkpoint to resume from."""
        cfg = self.config
        self.resume_path = None
        self.run_dir = None
        refused = None
        if self.is_main:
            try:
                self.run_dir = run_dir.RunDir(cfg.output_dir, cfg.overwrite_output_dir,
                                              resuming=bool(cfg.resume_from_checkpoint))
            except OSError as e:  # someone else's files, a live run, not writable
                refused = e
        distributed.raise_everywhere(self.accelerator, refused)  # also the barrier: the directory is ready
        if self.run_dir is not None and self.run_dir.moved_to:
            logger.warning("--overwrite_output_dir: the previous run in %s was moved to %s", cfg.output_dir,
                           self.run_dir.moved_to)
        self.checkpoints = CheckpointManager(cfg.output_dir, self.accelerator, cfg.save_total_limit)
        if cfg.resume_from_checkpoint:
            self.resume_path = self.checkpoints.resolve(cfg.resume_from_checkpoint)
        elif self.checkpoints.complete() and not cfg.overwrite_output_dir:
            raise FileExistsError(
                f"--output_dir {cfg.output_dir} already holds checkpoints; pass --resume_from_checkpoint latest "
                "to continue that run or --overwrite_output_dir to start over"
            )

    def _load_models(self, model, ref_model) -> loading.Models:
        models = loading.load_models(self.config, model, ref_model)
        self.family = loading.model_family(models.policy, self.tokenizer)
        self.reference_is_initial_policy = models.reference_is_initial_policy
        return models

    def elbo_module(self, model) -> ELBOModule:
        """``model`` wrapped so that its forward returns the run's ELBO terms (fused head, kernels, packing)."""
        cfg = self.config
        budget = cfg.ce_max_buffer_mb << 20 if cfg.ce_max_buffer_mb is not None else None
        return ELBOModule(model, self.mask_token_id, "auto" if cfg.fused_head else False, cfg.kernel_impl,
                          pack_length=cfg.max_length if cfg.packing else None, max_buffer_bytes=budget)

    def _prepare_optimization(self, models: loading.Models):
        """AdamW and the schedule; the policy's ELBO module through accelerate, the reference's beside it."""
        cfg, acc = self.config, self.accelerator
        params = [p for p in models.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        )
        from transformers import get_scheduler

        # The scheduler is stepped by hand once per optimizer step (accelerate would step it once per
        # process), and saved with the checkpoints.
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, self.max_steps)
        self.policy_elbo, self.optimizer = acc.prepare(self.elbo_module(models.policy), optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.ref_elbo = None
        if models.reference is not None:
            # Not handed to accelerate.prepare: it has no gradients to synchronise, and its frozen weights
            # must not be written into every checkpoint. Sharded like the policy under FSDP2.
            self.ref_elbo = distributed.place_reference(acc, self.elbo_module(models.reference))
        self.ref_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _restore(self):
        """The run state: fresh, or restored with the model, optimizer, scheduler and RNG states."""
        self.state, self.ref_eval, self._definition = RunState(), None, None
        if self.resume_path:
            saved = self.checkpoints.load(self.resume_path)
            self._check_same_run(saved.get("run"))
            self.state = RunState.from_checkpoint(saved)
            saved = os.path.join(self.resume_path, "eval_reference.pt")
            self.ref_eval = torch.load(saved, weights_only=True) if os.path.exists(saved) else None
            if self.is_main:
                logger.info("resumed from %s at step %d", self.resume_path, self.state.step)
        self.start_step = self.state.step

    def run_definition(self) -> dict:
        """What makes this run this run (saved with each checkpoint): the :data:`RUN_DEFINING` flags, the
        process count and the content of the data."""
        cfg = self.config
        out = {name: getattr(cfg, name) for name in RUN_DEFINING}
        out["num_processes"] = self.accelerator.num_processes
        out["train_data"] = self.train_pairs.content_hash()
        out["eval_data"] = self.eval_pairs.content_hash() if self.eval_pairs is not None else None
        return out

    def _check_same_run(self, saved: dict | None):
        """Refuse to resume with settings or data that differ from the checkpoint's, unless
        ``--allow_config_change``; then the optimizer's current settings replace the restored ones."""
        cfg = self.config
        if saved is None:
            logger.warning("%s predates saved run settings; they are not compared", self.resume_path)
            return
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.resume_path}/trainer_state.json: 'run' is not a JSON object; "
                                  "the checkpoint is corrupt")
        now = self._definition = self.run_definition()
        diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k, v) != v]
        if diffs and not cfg.allow_config_change:
            raise ValueError(
                f"--resume_from_checkpoint {self.resume_path}: this run differs from the checkpoint's "
                f"({'; '.join(diffs)}); resume with the same settings and data, or pass --allow_config_change "
                "to continue with the new ones"
            )
        if diffs:
            logger.warning("resuming with changed settings (--allow_config_change): %s", "; ".join(diffs))
        for group in self.optimizer.param_groups:  # the restored optimizer state carries the old settings
            group.update(weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        sched = self.scheduler
        if not hasattr(sched, "lr_lambdas"):
            return
        sched.base_lrs = [cfg.learning_rate] * len(sched.base_lrs)
        for group, lam in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = cfg.learning_rate, cfg.learning_rate * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    @property
    def policy_model(self) -> torch.nn.Module:
        """The policy LM itself (unwrapped from accelerate and from its ELBO module)."""
        return self._policy_module.model

    @property
    def _policy_module(self) -> ELBOModule:
        return self.accelerator.unwrap_model(self.policy_elbo)

    # --- data order ---------------------------------------------------------------------------

    def step_pairs(self, step: int) -> list[tuple[int, int]]:
        """``(epoch, pair index)`` of this process's share of ``step``'s global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(draw_key(self.config.seed, "order", epoch))
        perm = torch.randperm(len(self.train_pairs), generator=g)
        batch = perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()
        rank = self.accelerator.process_index
        return [(epoch, i) for i in batch[rank * self.local_batch : (rank + 1) * self.local_batch]]

    def micro_batches(self, step: int):
        share = self.step_pairs(step)
        size = self.config.per_device_train_batch_size
        return [share[i : i + size] for i in range(0, len(share), size)]

    # --- ELBO terms -----------------------------------------------------------------------------

    def batch_of(self, pairs_data, items):
        """Collate chosen then rejected sequences of ``items`` = [(epoch, index)]: [2B, L] tensors."""
        from .tokenization import collate

        seqs = [pairs_data.sequence(i, side) for side in (CHOSEN, REJECTED) for _, i in items]
        batch = collate(seqs, self.pad_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def keyed_draw(self, batch, items, stream: str, plan: SamplingPlan | None = None,
                   seed: int | None = None) -> MaskDraw:
        """Masks [2B, n, L] for ``batch``, keyed by ``(seed, stream, epoch, pair, side)`` (seed: the run's)."""
        seed = self.config.seed if seed is None else seed
        keys = [draw_key(seed, stream, e, i, side) for side in (CHOSEN, REJECTED) for e, i in items]
        return draw_masks_keyed(batch["response_mask"], plan or self.plan, keys)

    def draws(self, batch, items, stream: str = "train", ref_stream: str = "ref", plan: SamplingPlan | None = None,
              seed: int | None = None) -> tuple[MaskDraw, MaskDraw]:
        """The policy's draw and the reference's: the same one (antithetic sampling) or an independent one."""
        plan = plan or self.plan
        draw = self.keyed_draw(batch, items, stream, plan, seed)
        return draw, draw if plan.antithetic else self.keyed_draw(batch, items, ref_stream, plan, seed)

    def policy_terms(self, batch, draw: MaskDraw) -> torch.Tensor:
        """float32 [2B, n] policy ELBO terms, with gradients."""
        return self.policy_elbo(batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"])

    def reference_terms(self, batch, items, draw: MaskDraw) -> tuple[torch.Tensor, bool]:
        """float32 [2B, n] reference terms on ``draw``, and whether the reference model ran (False when
        the terms were precomputed)."""
        cached = [self.ref_cache.get(item) for item in items]
        if all(c is not None for c in cached):
            terms = torch.cat([torch.stack([c[0] for c in cached]), torch.stack([c[1] for c in cached])])
            return terms.to(self.accelerator.device), False
        args = (batch["input_ids"], batch["response_mask"], draw)
        # no_grad, not inference_mode: FSDP2 reuses its gathered-parameter buffers in the training forward.
        with torch.no_grad(), self.accelerator.autocast():
            if self.ref_elbo is not None:
                terms = self.ref_elbo(*args, attention_mask=batch["attention_mask"])
            else:  # LoRA: the reference is the policy with its adapters off
                with self.policy_model.disable_adapter():
                    terms = self._policy_module(*args, attention_mask=batch["attention_mask"])
        return terms.clone(), True  # clone: an ordinary tensor, usable next to autograd ones

    def precompute_reference(self):
        """Reference terms for every (epoch, pair) this process will train on, then free the reference."""
        todo = sorted({item for step in range(self.start_step, self.max_steps) for item in self.step_pairs(step)})
        size = self.config.per_device_train_batch_size
        bar = tqdm(range(0, len(todo), size), desc="reference ELBOs", disable=not self.is_main)
        for i in bar:
            items = todo[i : i + size]
            batch = self.batch_of(self.train_pairs, items)
            terms = self.reference_terms(batch, items, self.draws(batch, items)[1])[0].cpu()
            B = len(items)
            for b, item in enumerate(items):
                self.ref_cache[item] = torch.stack([terms[b], terms[B + b]])
        self.ref_elbo = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def grouped(self, terms: torch.Tensor, plan: SamplingPlan | None = None) -> torch.Tensor:
        """[B, n] -> [B, n_t]: the n_yt masks of a timestep are averaged, so that samples are
        independent for the ``score/var`` estimate (the mean, hence the loss, is unchanged)."""
        plan = plan or self.plan
        return terms.view(terms.shape[0], plan.n_t, plan.n_yt).mean(-1)

    def pair_margins(self, policy_terms: torch.Tensor, ref_terms: torch.Tensor) -> torch.Tensor:
        """[B] :func:`reward_margin` of the pairs of [2B, n] terms (chosen rows first)."""
        pol, ref = policy_terms.mean(-1), ref_terms.mean(-1)
        B = pol.shape[0] // 2
        return reward_margin(pol[:B], pol[B:], ref[:B], ref[B:])

    # --- one step -------------------------------------------------------------------------------

    def loss_on(self, items):
        """(loss, metrics, tokens through the models) of one micro-batch of pairs."""
        cfg = self.config
        batch = self.batch_of(self.train_pairs, items)
        draw, ref_draw = self.draws(batch, items)
        policy_terms = self.policy_terms(batch, draw)
        ref_terms, ref_ran = self.reference_terms(batch, items, ref_draw)
        B = len(items)
        pc, pr = self.grouped(policy_terms[:B]), self.grouped(policy_terms[B:])
        rc, rr = self.grouped(ref_terms[:B]), self.grouped(ref_terms[B:])
        loss, metrics = vrpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        metrics["loss/vrpo"] = loss.detach()
        if cfg.sft_weight > 0:
            sft = mdm_sft_loss(pc, batch["response_mask"][:B].sum(-1))
            metrics["loss/sft"] = sft.detach()
            loss = loss + cfg.sft_weight * sft
        # Tokens through the models: n masked copies of every real token, for the policy and the reference.
        tokens = int(batch["attention_mask"].sum()) * self.plan.n * (2 if ref_ran else 1)
        return loss, metrics, tokens

    def _backward_micro_batch(self, items, n_micro: int, sync: bool, step: int) -> tuple[dict, int, bool]:
        """Loss and backward (scaled by 1 / n_micro) of one of n_micro micro-batches; returns (metrics,
        tokens, whether the loss was not finite)."""
        acc = self.accelerator
        bad = False
        with acc.no_sync(self.policy_elbo) if not sync else contextlib.nullcontext():
            try:
                loss, metrics, tokens = self.loss_on(items)
            except NonFiniteELBOError as e:
                logger.warning("step %d: %s", step, e)
                bad = True
                # Every process must still run backward (DDP), so backward a zero.
                loss = sum(p.sum() for p in self.policy_elbo.parameters() if p.requires_grad) * 0.0
                metrics, tokens = {}, 0
            if not torch.isfinite(loss.detach()):
                bad = True
            acc.backward(loss / n_micro)
        return metrics, tokens, bad

    def train_step(self, step: int) -> tuple[bool, dict, int]:
        """One optimizer step. Returns (applied, metrics, tokens processed)."""
        acc, cfg = self.accelerator, self.config
        micro = self.micro_batches(step)
        sums: dict[str, float] = {}
        tokens, bad = 0, False
        for k, items in enumerate(micro):
            metrics, n_tok, bad_micro = self._backward_micro_batch(items, len(micro), k == len(micro) - 1, step)
            bad = bad or bad_micro
            tokens += n_tok
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v) / len(micro)
        params = [p for p in self.policy_elbo.parameters() if p.requires_grad]
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        bad = bad or not all(math.isfinite(g["lr"]) for g in self.optimizer.param_groups)
        flag = torch.tensor([1.0 if bad or not torch.isfinite(torch.as_tensor(grad_norm)) else 0.0], device=acc.device)
        bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            self.optimizer.step()
            if not self.weights_finite(params):
                self._roll_back(step)
                bad = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = self._mean_over_processes(sums)
        metrics["grad_norm"] = float(grad_norm)
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        return not bad, metrics, tokens

    def weights_finite(self, params=None) -> bool:
        """All of the policy's trainable weights are finite, on every process: one fused norm per device
        (it reads the weights once; no copy)."""
        params = params if params is not None else [p for p in self.policy_elbo.parameters() if p.requires_grad]
        # Sharded (FSDP2 DTensor) weights: each process checks its own shard; the reduce below joins them.
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        norms = torch._foreach_norm([t.detach() for t in local])
        bad = (~torch.isfinite(torch.stack(norms))).any().float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item() == 0)

    def _roll_back(self, step: int):
        """The update of ``step`` made weights non-finite: restore the weights and optimizer state of the
        last checkpoint (never written from non-finite weights) and keep the schedule where it is.

        Keeping a copy to undo one step would cost the weights and optimizer state again in memory at every
        step; this costs nothing until it happens, and then the steps since that checkpoint."""
        last = self.checkpoints.latest()
        if last is None:
            raise TrainingDiverged(f"step {step}: the update made weights non-finite and there is no checkpoint "
                                   "to go back to; lower --learning_rate")
        schedule = self.scheduler.state_dict()
        self.checkpoints.load(last)
        self.scheduler.load_state_dict(schedule)
        if self.is_main:
            logger.warning("step %d: the update made weights non-finite; weights and optimizer state rolled back "
                           "to %s", step, last)

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        acc = self.accelerator
        if acc.num_processes == 1 or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        t = acc.reduce(torch.tensor([metrics[k] for k in keys], device=acc.device, dtype=torch.float64), "mean")
        return dict(zip(keys, t.tolist()))

    # --- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def eval_terms(self, elbo, pairs_data) -> torch.Tensor:
        """float32 [N, 2, n] ELBO terms of every eval pair under a fixed, stratified draw."""
        plan = SamplingPlan(n_t=self.config.eval_n_t, stratified=True, estimator=self.config.estimator)
        acc = self.accelerator
        N = len(pairs_data)
        # Sharded models gather in every forward: every process runs the same number of batches.
        mine, real = distributed.balanced_share(N, acc.process_index, acc.num_processes)
        size = max(1, self.config.per_device_train_batch_size)
        out = torch.zeros(N, 2, plan.n, device=acc.device)
        was_training = elbo.training
        elbo.eval()
        for i in range(0, len(mine), size):
            items = [(0, j) for j in mine[i : i + size]]
            batch = self.batch_of(pairs_data, items)
            draw = self.keyed_draw(batch, items, "eval", plan)
            with acc.autocast():
                terms = elbo(batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"])
            B, keep = len(items), max(0, min(len(items), real - i))  # padding items are not kept
            idx = torch.tensor([j for _, j in items[:keep]], device=acc.device, dtype=torch.long)
            out[idx, 0], out[idx, 1] = terms[:B][:keep].float(), terms[B:][:keep].float()
        elbo.train(was_training)
        return acc.reduce(out, reduction="sum") if acc.num_processes > 1 else out

    def evaluate(self, ref_eval: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """Held-out preference accuracy: the policy's ELBO margin > 0, and (given the reference's
        terms) the implicit reward margin > 0."""
        try:
            policy = self.eval_terms(self._policy_module, self.eval_pairs)
        except NonFiniteELBOError as e:
            raise TrainingDiverged(
                f"held-out evaluation at step {self.state.step}: {e}; last checkpoint: {self.checkpoints.latest() or 'none'}"
            ) from e
        est = policy.mean(-1)
        metrics = {"eval/pref_acc": (est[:, 0] > est[:, 1]).float().mean().item()}
        if ref_eval is not None:
            ref = ref_eval.to(est.device).mean(-1)
            margin = reward_margin(est[:, 0], est[:, 1], ref[:, 0], ref[:, 1])
            metrics["eval/reward_acc"] = (margin > 0).float().mean().item()
            metrics["eval/reward_margin"] = (self.config.beta * margin).mean().item()
        return metrics, policy

    def evaluate_initial(self) -> dict:
        """Evaluate the initial policy (held-out pairs and graded generations, where there are any); keep
        the reference's eval terms for the reward accuracy."""
        before = {}
        if self.has_eval:
            before, policy_eval = self.evaluate(None)
            self.state.pref_acc_before = before["eval/pref_acc"]
            if self.reference_is_initial_policy:  # its terms are the ones just computed
                self.ref_eval = policy_eval
            else:
                self.ref_eval = self.eval_terms(self.ref_elbo, self.eval_pairs)
        generations = self.grade_generations()
        if generations is not None:
            self.state.gen_acc_before, self.state.gen_credit_before = generations.accuracy, generations.credit
            before.update(generation_metrics(generations))
        return before

    def grade_generations(self) -> GenerationReport | None:
        """The policy's greedy answers to the task's test prompts, graded by its verifier. None without
        a graded task (a user's --dataset), and on all but the main process (which, when the model is
        sharded, still take part in the forwards)."""
        acc = self.accelerator
        if self.task is None or not (self.is_main or distributed.is_sharded(acc)):
            return None
        with distributed.root_gathered(acc, self.policy_elbo):  # a sharded model's forwards need every process
            report = self.task.evaluate(self.policy_model, self.tokenizer, self.task.test_prompts())
        return report if self.is_main else None

    # --- the run: the loop ----------------------------------------------------------------------

    def train(self) -> dict:
        """Run from the current step to ``max_steps``; return the summary (also in ``summary.json``)."""
        t0 = time.time()
        try:
            with self._signals_stop_the_loop():
                log = self._open_logs()
                if self.resume_path is None and (initial := self.evaluate_initial()):
                    log.log(0, initial)
                if self.config.precompute_ref:
                    self.precompute_reference()
                self._loop(log)
            return self.finish(log, t0)
        finally:
            self.close()

    @contextlib.contextmanager
    def _signals_stop_the_loop(self):
        """SIGTERM/SIGINT ask the loop to stop after the current step with a checkpoint (a second one acts
        at once, as usual). Handlers can only be set from the main thread; elsewhere signals act as usual."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            self._signal = signum
            for sig, old in previous.items():
                signal.signal(sig, old)
            logger.warning("%s: finishing the current step, then writing a checkpoint (send it again to stop at "
                           "once)", signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_requested(self) -> bool:
        """A signal reached this process (or, with several processes, any of them)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._signal is not None
        flag = torch.tensor([1.0 if self._signal else 0.0], device=acc.device)
        if acc.reduce(flag, reduction="sum").item() == 0:
            return False
        self._signal = self._signal or signal.SIGTERM  # another process got it (a launcher forwards SIGTERM)
        return True

    def _stop_for_signal(self, log: MetricsLogger):
        """Checkpoint the step reached and raise :class:`Interrupted` saying how to resume."""
        path = self.save_checkpoint()
        log.close()
        name = signal.Signals(self._signal).name
        raise Interrupted(
            f"{name} at step {self.state.step}/{self.max_steps}; checkpoint: {path or 'none (weights not finite)'}. "
            f"Resume with the same command plus --output_dir {self.config.output_dir} --resume_from_checkpoint latest",
            self._signal,
        )

    def _open_logs(self) -> MetricsLogger:
        cfg = self.config
        if self.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.output_dir, "config.json"), json.dumps(vars(cfg), indent=1, default=str))
        return MetricsLogger(cfg.output_dir, self.is_main, cfg.report_to == "tensorboard",
                             self.start_step if self.resume_path else None)

    def _loop(self, log: MetricsLogger):
        bar = tqdm(total=self.max_steps, initial=self.state.step, desc="VRPO", disable=not self.is_main,
                   dynamic_ncols=True)
        window = LogWindow()
        while self.state.step < self.max_steps:
            if self._stop_requested():
                bar.close()
                self._stop_for_signal(log)
            fault_point("step", self.state.step)
            applied, metrics, tokens = self.train_step(self.state.step)
            self.state.step += 1
            self._account(applied, metrics, log)
            window.add(metrics, tokens)
            bar.update(1)
            if applied:
                bar.set_postfix(loss=f"{metrics['loss/vrpo']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                                tok_s=f"{window.tokens_per_s():.0f}")
            self._periodic(log, window)
        bar.close()

    def _account(self, applied: bool, metrics: dict, log: MetricsLogger):
        """Update the run state after a step; raise :class:`TrainingDiverged` after too many skips."""
        st, cfg = self.state, self.config
        if applied:
            st.consecutive_nonfinite = 0
            st.last_losses = (st.last_losses + [metrics["loss/vrpo"]])[-max(cfg.logging_steps, 1):]
            return
        st.skipped_steps += 1
        st.consecutive_nonfinite += 1
        if self.is_main:
            logger.warning("step %d skipped: non-finite learning rate, loss, gradient norm or weights", st.step)
        log.log(st.step, {"train/skipped": 1, "train/consecutive_nonfinite": st.consecutive_nonfinite})
        if st.consecutive_nonfinite >= cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{st.consecutive_nonfinite} consecutive steps had a non-finite loss, gradient norm or weights "
                f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}); stopping at step {st.step}. "
                f"Last good checkpoint: {self.checkpoints.latest() or 'none'}"
            )

    def _periodic(self, log: MetricsLogger, window: LogWindow):
        """Log, evaluate and checkpoint when the step calls for it (the last step is ``finish``'s)."""
        cfg, step = self.config, self.state.step
        if step % cfg.logging_steps == 0 or step == self.max_steps:
            log.log(step, window.record(self.state.skipped_steps))
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.max_steps and self.has_eval:
            log.log(step, self.evaluate(self.ref_eval)[0])
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.max_steps:
            self.save_checkpoint()

    # --- checkpoints and outputs ----------------------------------------------------------------

    def save_checkpoint(self) -> str | None:
        """An atomic checkpoint of the current step (every process calls this); the existing one when the
        step already has one; none (an error logged) when the weights are not finite."""
        step = self.state.step
        latest = self.checkpoints.latest()
        if latest is not None and os.path.basename(latest) == self.checkpoints.name(step):
            return latest
        if not self.weights_finite():
            logger.error("step %d: weights are not finite; no checkpoint written (last: %s)", step, latest or "none")
            return None

        def fault():
            fault_point("checkpoint", step)

        if self._definition is None:
            self._definition = self.run_definition()
        state = {**self.state.to_checkpoint(self.max_steps, self.config.seed), "run": self._definition}
        return self.checkpoints.save(step, state, fault=fault,
                                     extra_tensors={"eval_reference.pt": self.ref_eval})

    def save_final_model(self) -> str:
        """The trained policy (LoRA merged) and the tokenizer under ``<output_dir>/model``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = distributed.gathered_policy(acc, self.policy_elbo)  # collective when sharded
        path = os.path.join(self.config.output_dir, "model")
        fault_point("model", self.state.step)
        if acc.is_main_process:
            if self.config.use_lora:
                model = copy.deepcopy(model).merge_and_unload()
            loading.save_model(model, self.tokenizer, path)
        acc.wait_for_everyone()
        return path

    def sample_answers(self, graded: GenerationReport | None) -> list[dict]:
        """``--num_samples`` prompts answered by the policy (main process; others get []): a graded task's
        test answers with the verifier's verdicts, else ungraded answers to held-out pairs' prompts."""
        from .generate import sample_answers

        cfg, acc = self.config, self.accelerator
        if not (self.is_main or distributed.is_sharded(acc)):  # a sharded model's forwards need every process
            return []
        if self.task is not None:  # graded: the samples are the graded generations
            return graded.samples[: cfg.num_samples] if self.is_main else []
        # The embedded model answers at the reference's length (its context is short).
        with distributed.root_gathered(acc, self.policy_elbo):
            samples = sample_answers(self.policy_model, self.tokenizer, self.eval_pairs, self.mask_token_id,
                                     cfg.num_samples, gen_length=cfg.gen_length or (None if cfg.toy else 128),
                                     steps=cfg.gen_steps, block_length=cfg.block_length)
        return samples if self.is_main else []

    def outputs(self) -> dict[str, str]:
        """What the run writes, by name: the closing summary lists every one."""
        cfg = self.config
        logs = os.path.join(cfg.output_dir, "logs")
        out = {"model": os.path.join(cfg.output_dir, "model"), "checkpoints": self.checkpoints.root,
               "metrics": os.path.join(logs, "metrics.jsonl"), "summary": os.path.join(cfg.output_dir, "summary.json")}
        if cfg.report_to == "tensorboard":
            out["tensorboard"] = os.path.join(logs, "tensorboard")
        return out

    def write_plot(self, summary: dict) -> str | None:
        """``plots/training.png`` from the logged metrics and the summary (main process, with matplotlib)."""
        from .plots import PLOT_FILE, plot_training, read_metrics

        if not self.is_main:
            return None
        path = os.path.join(self.config.output_dir, PLOT_FILE)
        return plot_training(read_metrics(self.outputs()["metrics"]), summary, path)

    def finish(self, log: MetricsLogger, t0: float) -> dict:
        """The final evaluation, checkpoint and model, the samples, and ``summary.json``."""
        cfg, st = self.config, self.state
        summary = {"steps": st.step, "skipped_steps": st.skipped_steps}
        if self.has_eval:
            if st.final_eval is None:  # else: resumed from the final checkpoint, evaluated and logged before it
                st.final_eval, _ = self.evaluate(self.ref_eval)
                log.log(st.step, st.final_eval)
            after = st.final_eval
            summary.update(pref_acc_before=st.pref_acc_before, pref_acc_after=after["eval/pref_acc"],
                           reward_acc_after=after.get("eval/reward_acc"))
        generations = self.grade_generations()
        if generations is not None:
            log.log(st.step, generation_metrics(generations))
            summary.update(gen_prompts=len(generations.samples), gen_acc_before=st.gen_acc_before,
                           gen_acc_after=generations.accuracy,
                           gen_credit_before=st.gen_credit_before, gen_credit_after=generations.credit)
        self.save_checkpoint()
        model_dir = self.save_final_model()
        losses = st.last_losses
        summary.update(
            final_loss=sum(losses) / len(losses) if losses else None,
            wall_s=time.time() - t0,
            output_dir=cfg.output_dir,
            model_dir=model_dir,
            logs=os.path.join(cfg.output_dir, "logs"),
            family=self.family.display_name,
            sampler=self.family.sampler_name,
            estimator={"n_t": self.plan.n_t, "n_yt": self.plan.n_yt, "antithetic": self.plan.antithetic,
                       "estimator": self.plan.estimator, "stratified": self.plan.stratified},
            data=self.data_stats,
        )
        if cfg.num_samples and (self.has_eval or generations is not None):
            summary["samples"] = self.sample_answers(generations)
        log.close()
        summary["outputs"] = self.outputs()
        plot = self.write_plot(summary)
        if plot:
            summary["outputs"]["plot"] = plot
        if self.is_main:
            atomic_write_text(summary["outputs"]["summary"], json.dumps(summary, indent=1))
        self.accelerator.end_training()
        return summary
