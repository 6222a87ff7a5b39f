"""``ELBOTrainer``: the training loop every algorithm shares, around ELBO estimates of log-likelihoods.

A run, top-down:

1. build (``__init__``): resolve the config (a task's presets for a task's model); load the tokenizer, then
   read and tokenize the data, then load the models (:mod:`.loading`); the optimizer and scheduler
   (:mod:`.optimization`); restore
   a checkpoint if resuming (:mod:`.resume`);
2. ``train``: evaluate the initial policy (:mod:`.evaluation`), then the loop of ``train_step``, with logging
   (:mod:`.logs`), evaluation and checkpoints (:mod:`.checkpoints`), stopping cleanly on SIGTERM/SIGINT
   (:mod:`.signals`);
3. ``finish``: the final evaluation, checkpoint, model and samples (:mod:`.outputs`), and ``summary.json``.

One optimizer step (``train_step``): the algorithm's micro-batches of the step; for each, the algorithm's loss
and its backward (gradient accumulation); clipping; the step is skipped, on every process, if the learning
rate, loss or gradient norm is not finite on one (:func:`.optimization.clip_and_agree`); after the update the
weights are checked (one fused norm) and rolled back to the last checkpoint if they are not; the run stops after
too many bad steps in a row.

The algorithms (:mod:`.preference`: ``VRPOTrainer``; :mod:`.grpo`: ``GRPOTrainer``) sit beside each other on
this class; :func:`vrpo.training.trainer_for` picks one from a config.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..errors import NonFiniteELBOError, TrainingDiverged
from ..estimator import SamplingPlan
from . import advisor_tally, distributed, loading, optimization, outputs, run_dir
from .batches import Batches
from .config import TrainingConfig
from .evaluation import PreferenceEval, check_split, grade_generations
from .logs import LogWindow, MetricsLogger, Progress
from .reference import Reference
from .resume import RunState, restore, run_definition
from .schedule import Item, Schedule
from .signals import StopSignals, fault_point
from .task import GradedTask, generation_metrics

logger = logging.getLogger("vrpo")


def grouped(terms: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """[B, n] -> [B, n_t]: the n_yt masks of a timestep are averaged, so that samples are independent for the
    ``score/var`` estimate (the mean, hence the loss, is unchanged). ``plan``: the draw's."""
    return terms.view(terms.shape[0], plan.n_t, plan.n_yt).mean(-1)


class ELBOTrainer:
    """Train a masked diffusion LM with a loss on ELBO estimates; an algorithm is a subclass.

    What an algorithm sets (the rest is the loop's):

    - ``CONFIG``: its config class (a :class:`~vrpo.training.config.TrainingConfig`); ``NAME`` (the progress
      bar's); ``LOSS_METRIC`` (the loss the run state keeps); ``PROGRESS``: the progress bar's figures,
      ``{label: (metric, format)}``;
    - ``loss_on(items, step)``: ``(loss, metrics, tokens through the models)`` of one micro-batch of
      ``items`` = [(epoch, index)] of optimizer step ``step`` (the only hook without a default);
    - ``micro_batches(step)``: this process's micro-batches of items of ``step`` (default: the schedule's);
    - ``steps_per_epoch()``: optimizer steps in one pass over the data (default: the schedule's);
    - ``task_presets(task)``: the task's presets for the algorithm (default: ``task.presets``);
    - ``before_loop()``: work between the initial evaluation and the first step (default: none).

    Args:
        config: the run's config (``None`` fields are resolved).
        task: a :class:`~vrpo.training.task.GradedTask`: the model, data and presets of a run that names none,
            and the verifier that grades generations when the run trains on the task's pairs.
        model, ref_model, tokenizer, train_pairs, eval_pairs: objects to use instead of loading them (the API
            route); ``ref_model`` defaults to a frozen copy of the initial policy (LoRA: adapters off).
        callbacks: objects with ``on_step_end(trainer, step, seconds)``, called after each optimizer step
            (steps done, the step's wall time), before logging, evaluation and checkpoints.
    """

    CONFIG = TrainingConfig
    NAME = "ELBO"
    LOSS_METRIC = "loss"
    PROGRESS: dict[str, tuple[str, str]] = {}

    def __init__(
        self,
        config: TrainingConfig,
        model=None,
        ref_model=None,
        tokenizer=None,
        train_pairs=None,
        eval_pairs=None,
        task: GradedTask | None = None,
        callbacks=(),
    ):
        if not isinstance(config, self.CONFIG):
            raise TypeError(
                f"{type(self).__name__} takes a {self.CONFIG.__name__}, got "
                f"{type(config).__name__} (vrpo.training.trainer_for picks a config's trainer)"
            )
        presets = self.task_presets(task) if task is not None and config.model_name_or_path is None else None
        self.config = cfg = config.resolved(presets)
        self.task = task if cfg.dataset is None else None  # a user's data is never graded
        check_split(self.task, cfg.gen_eval_split)
        self.callbacks = list(callbacks)
        self.plan = cfg.sampling_plan()
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision)
        distributed.check_supported(acc)
        set_seed(cfg.seed)
        self.is_main = acc.is_main_process
        run_dir.check_writable(cfg.output_dir)  # before the (slow) loading, but nothing written yet
        if presets and self.is_main and (note := config.preset_note(task.name, presets)):
            # A user's dataset on the task's model gets presets made for the task: say so loudly.
            logger.log(logging.INFO if cfg.dataset is None else logging.WARNING, note)
        self.tokenizer = tok = tokenizer if tokenizer is not None else loading.load_run_tokenizer(cfg, task)
        self.mask_token_id = loading.mask_token_id(cfg, tok)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        impl = "torch" if cfg.kernel_impl == "eager" else cfg.kernel_impl
        self.batches = Batches(pad_id, acc.device, cfg.seed, self.mask_token_id, impl)
        self.data_stats = {}
        if train_pairs is None:
            train_pairs, eval_pairs, self.data_stats = loading.load_pairs(cfg, tok, task)
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.has_eval = eval_pairs is not None and len(eval_pairs) > 0
        self.schedule = Schedule.for_run(cfg, len(train_pairs), acc)
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch() * cfg.num_train_epochs
        self.evaluator = PreferenceEval.for_run(cfg, acc, self.batches)
        self.run_dir, self.checkpoints, self.resume_path = run_dir.open_run(cfg, acc)
        try:
            self._prepare_optimization(loading.load_models(cfg, task, model, ref_model))
            self._restore()
        except BaseException:
            self.close()
            raise

    # --- what an algorithm overrides --------------------------------------------------------------

    def task_presets(self, task: GradedTask):
        return task.presets

    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[Item]]:
        return self.schedule.micro_batches(step)

    def loss_on(self, items: list[Item], step: int):
        raise NotImplementedError(f"{type(self).__name__}.loss_on")

    def before_loop(self):
        pass

    # --- building ---------------------------------------------------------------------------------

    def close(self):
        """Release the output directory (``train`` does this when it returns or raises)."""
        if self.run_dir is not None:
            self.run_dir.close()

    def _prepare_optimization(self, models: loading.Models):
        """AdamW and the schedule; the policy's ELBO module through accelerate, the reference's beside it."""
        cfg, acc = self.config, self.accelerator
        self.family = loading.model_family(models.policy, self.tokenizer)
        self.reference_is_initial_policy = models.reference_is_initial_policy
        params = [p for p in models.policy.parameters() if p.requires_grad]
        optimizer, self.scheduler = optimization.build_optimizer(params, cfg, self.max_steps)
        policy = loading.elbo_module(models.policy, cfg, self.mask_token_id)
        self.policy_elbo, self.optimizer = acc.prepare(policy, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        # Not through accelerate.prepare: no gradients to synchronise, and its frozen weights stay out of
        # every checkpoint. Sharded like the policy under FSDP2.
        ref = models.reference
        ref = (
            None if ref is None else distributed.place_reference(acc, loading.elbo_module(ref, cfg, self.mask_token_id))
        )
        self.reference = Reference(acc, ref, acc.unwrap_model(self.policy_elbo))

    def _restore(self):
        """The run state: fresh, or restored with the model, optimizer, scheduler and RNG states."""
        self.state, self.ref_eval = RunState(), None
        if self.resume_path:
            self.state, self.ref_eval = restore(
                self.checkpoints, self.resume_path, self.run_definition, self.config, self.optimizer, self.scheduler
            )
            if self.is_main:
                logger.info("resumed from %s at step %d", self.resume_path, self.state.step)
        self.start_step = self.state.step
        self.variances = advisor_tally.VarianceTally()

    @functools.cached_property
    def run_definition(self) -> dict:
        """What makes this run this run (hashes the data: computed once, when first needed)."""
        return run_definition(self.config, self.accelerator.num_processes, self.train_pairs, self.eval_pairs)

    @property
    def policy_model(self) -> torch.nn.Module:
        """The policy LM itself (unwrapped from accelerate and from its ELBO module)."""
        return self.accelerator.unwrap_model(self.policy_elbo).model

    # --- one step -------------------------------------------------------------------------------

    def _backward_micro_batch(self, items, n_micro: int, sync: bool, step: int) -> tuple[dict, int, bool]:
        """Loss and backward (scaled by 1 / n_micro) of one of n_micro micro-batches; returns (metrics,
        tokens, whether the loss was not finite)."""
        acc = self.accelerator
        with acc.no_sync(self.policy_elbo) if not sync else contextlib.nullcontext():
            try:
                loss, metrics, tokens = self.loss_on(items, step)
                bad = not torch.isfinite(loss.detach())
            except NonFiniteELBOError as e:
                logger.warning("step %d: %s", step, e)
                # Every process must still run backward (DDP), so backward a zero.
                loss = sum(p.sum() for p in self.policy_elbo.parameters() if p.requires_grad) * 0.0
                metrics, tokens, bad = {}, 0, True
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
        bad, grad_norm = optimization.clip_and_agree(acc, self.optimizer, params, cfg.max_grad_norm, bad)
        if not bad:
            self.optimizer.step()
            if not self.weights_finite(params):  # back to the last checkpoint's weights and optimizer state
                last = self.checkpoints.roll_back(step, self.scheduler)
                if self.is_main:
                    logger.warning("step %d: the update made weights non-finite; rolled back to %s", step, last)
                bad = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = distributed.mean_over_processes(acc, sums)
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        return not bad, metrics, tokens

    def weights_finite(self, params=None) -> bool:
        """All of the policy's trainable weights are finite, on every process."""
        params = params if params is not None else [p for p in self.policy_elbo.parameters() if p.requires_grad]
        return distributed.all_finite(self.accelerator, params)

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self, ref_eval: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """Held-out preference and reward accuracy of the policy (:class:`.evaluation.PreferenceEval`)."""
        try:
            return self.evaluator.evaluate(self.policy_elbo, self.eval_pairs, ref_eval)
        except NonFiniteELBOError as e:
            raise TrainingDiverged(
                f"held-out evaluation at step {self.state.step}: {e}; last checkpoint: "
                f"{self.checkpoints.latest() or 'none'}"
            ) from e

    def evaluate_initial(self) -> dict:
        """Evaluate the initial policy (held-out pairs and graded generations, where there are any); keep the
        reference's eval terms for the reward accuracy."""
        before = {}
        if self.has_eval:
            before, policy_eval = self.evaluate(None)
            self.state.pref_acc_before = before["eval/pref_acc"]
            # A copy of the initial policy (or LoRA's): its terms are the ones just computed.
            initial = self.reference_is_initial_policy
            self.ref_eval = policy_eval if initial else self.evaluator.terms(self.reference.elbo, self.eval_pairs)
        generations = self.grade_generations()
        if generations is not None:
            self.state.gen_acc_before, self.state.gen_credit_before = generations.accuracy, generations.credit
            before.update(generation_metrics(generations))
        return before

    def grade_generations(self):
        """The policy's greedy answers to the task's --gen_eval_split prompts, graded (None: no task, or not the
        main process)."""
        cfg = self.config
        return grade_generations(
            self.task, self.accelerator, self.policy_elbo, self.tokenizer, cfg.gen_eval_prompts, cfg.gen_eval_split
        )

    # --- the run: the loop ----------------------------------------------------------------------

    def train(self) -> dict:
        """Run from the current step to ``max_steps``; return the summary (also in ``summary.json``)."""
        t0, cfg = time.time(), self.config
        try:
            with StopSignals() as signals:
                if self.is_main:
                    outputs.write_config(cfg.output_dir, cfg)
                resume_step = self.start_step if self.resume_path else None
                log = MetricsLogger(cfg.output_dir, self.is_main, cfg.report_to == "tensorboard", resume_step)
                if self.resume_path is None and (initial := self.evaluate_initial()):
                    log.log(0, initial)
                self.before_loop()
                self._loop(log, signals)
            return self.finish(log, t0)
        finally:
            self.close()

    def _loop(self, log: MetricsLogger, signals: StopSignals):
        bar = Progress(self.max_steps, self.state.step, self.NAME, self.PROGRESS, self.is_main)
        window = LogWindow()
        while self.state.step < self.max_steps:
            if signals.requested(self.accelerator):
                bar.close()
                self._stop_for_signal(log, signals)
            fault_point("step", self.state.step)
            t = time.perf_counter()
            applied, metrics, tokens = self.train_step(self.state.step)
            seconds = time.perf_counter() - t
            self.state.step += 1
            for callback in self.callbacks:
                callback.on_step_end(self, self.state.step, seconds)
            self._account(applied, metrics, log)
            window.add(metrics, tokens)
            bar.step(metrics, applied, window.tokens_per_s())
            if applied:
                self.variances.add(metrics)
            self._periodic(log, window)
        bar.close()

    def _stop_for_signal(self, log: MetricsLogger, signals: StopSignals):
        """Checkpoint the step reached and raise :class:`~vrpo.errors.Interrupted` saying how to resume."""
        path = self.save_checkpoint()
        log.close()
        raise signals.interrupted(self.state.step, self.max_steps, path, self.config.output_dir)

    def _account(self, applied: bool, metrics: dict, log: MetricsLogger):
        """Count the step in the run state; log a skipped one; stop after too many in a row."""
        st, cfg = self.state, self.config
        if st.count(applied, metrics[self.LOSS_METRIC] if applied else None, cfg.logging_steps):
            if self.is_main:
                logger.warning("step %d skipped: non-finite learning rate, loss, gradient norm or weights", st.step)
            log.log(st.step, {"train/skipped": 1, "train/consecutive_nonfinite": st.consecutive_nonfinite})
            st.check_streak(cfg.max_nonfinite_steps, self.checkpoints.latest())

    def _periodic(self, log: MetricsLogger, window: LogWindow):
        """Log, evaluate and checkpoint when the step calls for it (the last step is ``finish``'s)."""
        cfg, step = self.config, self.state.step
        if step % cfg.logging_steps == 0 or step == self.max_steps:
            record = window.record(self.state.skipped_steps)
            record.update(advisor_tally.advice_metrics(record, self.schedule.global_batch, self.plan))
            log.log(step, record)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.max_steps and self.has_eval:
            log.log(step, self.evaluate(self.ref_eval)[0])
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.max_steps:
            self.save_checkpoint()

    # --- checkpoints and outputs ----------------------------------------------------------------

    def save_checkpoint(self) -> str | None:
        """An atomic checkpoint of the current step (every process calls this); the existing one when the step
        already has one; none (an error logged) when the weights are not finite."""
        step = self.state.step
        latest = self.checkpoints.latest()
        if latest is not None and os.path.basename(latest) == self.checkpoints.name(step):
            return latest  # resumed from this step's, or saved already (a stop right after a save)
        if not self.weights_finite():
            logger.error("step %d: weights are not finite; no checkpoint written (last: %s)", step, latest or "none")
            return None
        state = {**self.state.to_checkpoint(self.max_steps, self.config.seed), "run": self.run_definition}
        return self.checkpoints.save(
            step,
            state,
            fault=lambda: fault_point("checkpoint", step),
            extra_tensors={"eval_reference.pt": self.ref_eval},
        )

    def finish(self, log: MetricsLogger, t0: float) -> dict:
        """The final evaluation, checkpoint and model, the samples, and ``summary.json``."""
        cfg, st = self.config, self.state
        summary = {"algorithm": cfg.algorithm, "steps": st.step, "skipped_steps": st.skipped_steps}
        if self.has_eval:
            if st.final_eval is None:  # else: resumed from the final checkpoint, evaluated and logged already
                st.final_eval, _ = self.evaluate(self.ref_eval)
                log.log(st.step, st.final_eval)
            summary.update(outputs.preference_summary(st))
        generations = self.grade_generations()
        if generations is not None:
            log.log(st.step, generation_metrics(generations))
            summary.update(outputs.generation_summary(st, generations, cfg.gen_eval_split))
        self.save_checkpoint()
        model_dir = outputs.save_final_model(
            self.accelerator, self.policy_elbo, self.tokenizer, cfg.output_dir, cfg.use_lora, st.step
        )
        summary.update(
            final_loss=st.final_loss,
            wall_s=time.time() - t0,
            **outputs.run_facts(cfg.output_dir, model_dir, self.family, self.plan),
            data=self.data_stats,
            **self.variances.summary(self.schedule.global_batch, self.plan),
        )
        if cfg.num_samples and self.task is not None:  # a graded run's: its graded answers (main process)
            summary["samples"] = generations.samples[: cfg.num_samples] if self.is_main else []
        elif cfg.num_samples and self.has_eval:
            acc, pairs = self.accelerator, self.eval_pairs
            samples = outputs.held_out_samples(acc, self.policy_elbo, self.tokenizer, cfg, pairs, self.mask_token_id)
            summary["samples"] = samples
        log.close()
        outputs.write_summary(
            cfg.output_dir, self.checkpoints.root, cfg.report_to == "tensorboard", summary, self.is_main
        )
        self.accelerator.end_training()
        return summary
