"""``VRPOTrainer``: the loop around the library's maths (sampling, ELBO, loss).

A run, top-down:

1. build (``__init__``): resolve the config (a task's presets for a task's model); load the tokenizer, then
   read and tokenize the data, then load the models (:mod:`.loading`); the optimizer and scheduler; restore
   a checkpoint if resuming (:mod:`.resume`);
2. ``train``: evaluate the initial policy (:mod:`.evaluation`), precompute the reference if asked, then the
   loop of ``train_step``, with logging (:mod:`.logs`), evaluation and :mod:`.checkpoints`, stopping
   cleanly on SIGTERM/SIGINT (:mod:`.signals`);
3. ``finish``: the final evaluation, checkpoint, model and samples (:mod:`.outputs`), and ``summary.json``.

One optimizer step (``train_step``):

1. take this process's share of the step's global batch of pairs (:class:`.schedule.Schedule`);
2. make the noisy inputs of every chosen and rejected sequence on the device, keyed by ``(seed, epoch, pair,
   side)`` (Philox, :func:`~vrpo.estimator.noisy_draw`) so a draw never
   depends on batching, padding, process count or resumption (:class:`.batches.Batches`);
3. run the policy on its draws (with gradients) and the reference on the same draws (antithetic) or fresh
   ones, without gradients; chosen and rejected go through in one batch;
4. VRPO loss (+ the SFT term), backward, gradient accumulation, clipping;
5. skip the step if the learning rate, loss or gradient norm is not finite; after the update, check the
   weights (one fused norm) and roll back to the last checkpoint if they are not; stop after too many bad
   steps in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..errors import Interrupted, NonFiniteELBOError, TrainingDiverged
from ..estimator import (
    ELBOModule,
    NoisyDraw,
    SamplingPlan,
    mdm_sft_loss,
    reward_margin,
    vrpo_loss,
)
from ..files import atomic_write_text
from . import advisor_tally as budget
from . import distributed, loading, outputs, run_dir
from .batches import Batches
from .config import VRPOConfig
from .evaluation import PreferenceEval, grade_generations
from .logs import LogWindow, MetricsLogger
from .reference import Reference
from .resume import RunState, apply_optimizer_settings, check_same_run, run_definition
from .schedule import Schedule
from .signals import StopSignals, fault_point
from .task import GradedTask, generation_metrics

logger = logging.getLogger("vrpo")


class VRPOTrainer:
    """Train a masked diffusion LM with VRPO.

    Args:
        config: the run's :class:`~vrpo.training.config.VRPOConfig` (``None`` fields are resolved).
        task: a :class:`~vrpo.training.task.GradedTask`: the model, data and presets of a run that names none,
            and the verifier that grades generations when the run trains on the task's pairs.
        model, ref_model, tokenizer: optional objects to use instead of loading them from the config (the API
            route). ``ref_model`` defaults to a frozen copy of the initial policy (or, with LoRA, the policy with
            its adapters off).
        train_pairs, eval_pairs: optional :class:`~vrpo.training.data.TokenizedPairs`.
    """

    def __init__(self, config: VRPOConfig, model=None, ref_model=None, tokenizer=None, train_pairs=None,
                 eval_pairs=None, task: GradedTask | None = None):
        presets = self.task_presets(task) if task is not None and config.model_name_or_path is None else None
        self.config = cfg = config.resolved(presets)
        self.task = task if cfg.dataset is None else None  # a user's data is never graded
        self.plan = cfg.sampling_plan()
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision)
        distributed.check_supported(acc)
        set_seed(cfg.seed)
        self.is_main = acc.is_main_process
        run_dir.check_writable(cfg.output_dir)  # before the (slow) loading, but nothing written yet
        if presets and self.is_main and (note := config.preset_note(task.name, presets)):
            # A user's dataset on the task's model gets presets made for the task: say so loudly.
            logger.log(logging.INFO if cfg.dataset is None else logging.WARNING, note)
        self.tokenizer = tokenizer if tokenizer is not None else loading.load_run_tokenizer(cfg, task)
        self.mask_token_id = loading.mask_token_id(cfg, self.tokenizer)
        tok = self.tokenizer
        self.batches = Batches(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, acc.device,
                               cfg.seed, self.mask_token_id, "torch" if cfg.kernel_impl == "eager" else cfg.kernel_impl)
        self.data_stats = {}
        if train_pairs is None:
            train_pairs, eval_pairs, self.data_stats = loading.load_pairs(cfg, self.tokenizer, task)
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.schedule = Schedule(cfg.seed, len(train_pairs), cfg.per_device_train_batch_size,
                                 cfg.gradient_accumulation_steps, acc.process_index, acc.num_processes)
        self.schedule.check()
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch() * cfg.num_train_epochs
        self.evaluator = PreferenceEval(acc, self.batches, SamplingPlan(n_t=cfg.eval_n_t, stratified=True,
                                        estimator=cfg.estimator), max(1, cfg.per_device_train_batch_size), cfg.beta)
        self.run_dir, self.checkpoints, self.resume_path = run_dir.open_run(cfg, acc)
        try:
            self._prepare_optimization(loading.load_models(cfg, task, model, ref_model))
            self._restore()
        except BaseException:
            self.close()
            raise

    NAME = "VRPO"  # the progress bar's
    LOSS_METRIC = "loss/vrpo"  # the loss the run state keeps the last values of

    def task_presets(self, task: GradedTask):
        """The task's presets for this trainer's algorithm."""
        return task.presets

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training data."""
        return self.schedule.steps_per_epoch

    def micro_batches(self, step: int):
        """This process's micro-batches of items of optimizer step ``step``."""
        return self.schedule.micro_batches(step)

    def progress(self, metrics: dict, window: LogWindow) -> dict:
        """The progress bar's figures after an applied step."""
        return dict(loss=f"{metrics['loss/vrpo']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                    tok_s=f"{window.tokens_per_s():.0f}")

    def close(self):
        """Release the output directory (``train`` does this when it returns or raises)."""
        if self.run_dir is not None:
            self.run_dir.close()

    @property
    def has_eval(self) -> bool:
        return self.eval_pairs is not None and len(self.eval_pairs) > 0

    def elbo_module(self, model) -> ELBOModule:
        """``model`` wrapped so that its forward returns the run's ELBO terms (fused head, kernels, packing)."""
        cfg = self.config
        return ELBOModule(model, self.mask_token_id, cfg.head_options(),
                          pack_length=cfg.max_length if cfg.packing else None)

    def _prepare_optimization(self, models: loading.Models):
        """AdamW and the schedule; the policy's ELBO module through accelerate, the reference's beside it."""
        cfg, acc = self.config, self.accelerator
        self.family = loading.model_family(models.policy, self.tokenizer)
        self.reference_is_initial_policy = models.reference_is_initial_policy
        params = [p for p in models.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        # Stepped by hand once per optimizer step (accelerate would step it once per process), and saved with
        # the checkpoints.
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, self.max_steps)
        self.policy_elbo, self.optimizer = acc.prepare(self.elbo_module(models.policy), optimizer)
        acc.register_for_checkpointing(self.scheduler)
        # Not handed to accelerate.prepare: it has no gradients to synchronise, and its frozen weights must not
        # be written into every checkpoint. Sharded like the policy under FSDP2.
        ref = None if models.reference is None else distributed.place_reference(acc, self.elbo_module(models.reference))
        self.reference = Reference(acc, ref, self._policy_module)

    def _restore(self):
        """The run state: fresh, or restored with the model, optimizer, scheduler and RNG states."""
        self.state, self.ref_eval, self._definition = RunState(), None, None
        if self.resume_path:
            saved = self.checkpoints.load(self.resume_path)
            self._definition = self.run_definition()
            if check_same_run(saved.get("run"), self._definition, self.resume_path, self.config.allow_config_change):
                apply_optimizer_settings(self.config, self.optimizer, self.scheduler)
            self.state = RunState.from_checkpoint(saved)
            saved = os.path.join(self.resume_path, "eval_reference.pt")
            self.ref_eval = torch.load(saved, weights_only=True) if os.path.exists(saved) else None
            if self.is_main:
                logger.info("resumed from %s at step %d", self.resume_path, self.state.step)
        self.start_step = self.state.step
        self.variances = budget.VarianceTally()

    def run_definition(self) -> dict:
        return run_definition(self.config, self.accelerator.num_processes, self.train_pairs, self.eval_pairs)

    @property
    def policy_model(self) -> torch.nn.Module:
        """The policy LM itself (unwrapped from accelerate and from its ELBO module)."""
        return self._policy_module.model

    @property
    def _policy_module(self) -> ELBOModule:
        return self.accelerator.unwrap_model(self.policy_elbo)

    # --- ELBO terms -----------------------------------------------------------------------------

    def batch_of(self, pairs_data, items):
        """Chosen then rejected sequences of ``items`` = [(epoch, index)]: [2B, L] tensors on the device."""
        return self.batches.of(pairs_data, items)

    def draws(self, batch, items, stream: str = "train", ref_stream: str = "ref", plan: SamplingPlan | None = None,
              seed: int | None = None) -> tuple[NoisyDraw, NoisyDraw]:
        """The policy's draw and the reference's (the same one under antithetic sampling)."""
        return self.batches.draws(batch, items, plan or self.plan, stream, ref_stream, seed)

    def policy_terms(self, batch, draw: NoisyDraw) -> torch.Tensor:
        """float32 [2B, n] policy ELBO terms, with gradients."""
        return self.policy_elbo(batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"])

    def reference_terms(self, batch, items, draw: NoisyDraw) -> tuple[torch.Tensor, bool]:
        """float32 [2B, n] reference terms on ``draw``, and whether the reference model ran."""
        return self.reference.terms(batch, items, draw)

    @property
    def ref_elbo(self) -> ELBOModule | None:
        return self.reference.elbo

    @ref_elbo.setter
    def ref_elbo(self, module: ELBOModule | None):
        self.reference.elbo = module

    def precompute_reference(self):
        """Reference terms for every (epoch, pair) this process will train on, then free the reference."""
        todo = sorted({it for step in range(self.start_step, self.max_steps) for it in self.schedule.step_pairs(step)})

        def batch_and_draw(items):
            batch = self.batch_of(self.train_pairs, items)
            return batch, self.draws(batch, items)[1]

        self.reference.precompute(todo, self.config.per_device_train_batch_size, batch_and_draw, self.is_main)

    def grouped(self, terms: torch.Tensor, plan: SamplingPlan | None = None) -> torch.Tensor:
        """[B, n] -> [B, n_t]: the n_yt masks of a timestep are averaged, so that samples are independent for
        the ``score/var`` estimate (the mean, hence the loss, is unchanged). ``plan``: the draw's (default the
        run's)."""
        plan = plan or self.plan
        return terms.view(terms.shape[0], plan.n_t, plan.n_yt).mean(-1)

    def pair_margins(self, policy_terms: torch.Tensor, ref_terms: torch.Tensor) -> torch.Tensor:
        """[B] :func:`~vrpo.estimator.reward_margin` of the pairs of [2B, n] terms (chosen rows first)."""
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
        metrics.update(budget.step_variances(pc, pr, rc, rr, cfg.beta))  # the advisor's two parts; metrics only
        if cfg.pref_weight != 1.0:  # only then: the default's loss stays bit for bit
            loss = cfg.pref_weight * loss
        if cfg.sft_weight > 0:
            sft = mdm_sft_loss(pc, batch["response_mask"][:B].sum(-1))
            metrics["loss/sft"] = sft.detach()
            loss = loss + cfg.sft_weight * sft
        # Tokens through the models: n masked copies of every real token, for the policy and the reference.
        tokens = int(batch["attention_mask"].sum()) * self.plan.n * (2 if ref_ran else 1)
        return loss, metrics, tokens

    def _backward_micro_batch(self, items, n_micro: int, sync: bool, step: int) -> tuple[dict, int, bool]:
        """Loss and backward (scaled by 1 / n_micro) of one of n_micro micro-batches; returns (metrics, tokens,
        whether the loss was not finite)."""
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
        metrics = distributed.mean_over_processes(acc, sums)
        metrics["grad_norm"] = float(grad_norm)
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        return not bad, metrics, tokens

    def weights_finite(self, params=None) -> bool:
        """All of the policy's trainable weights are finite, on every process."""
        params = params if params is not None else [p for p in self.policy_elbo.parameters() if p.requires_grad]
        return distributed.all_finite(self.accelerator, params)

    def _roll_back(self, step: int):
        """The update of ``step`` made weights non-finite: restore the weights and optimizer state of the last
        checkpoint (never written from non-finite weights) and keep the schedule where it is.

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

    # --- evaluation -----------------------------------------------------------------------------

    def eval_terms(self, elbo, pairs_data) -> torch.Tensor:
        """float32 [N, 2, n] ELBO terms of every eval pair under the fixed, stratified evaluation draw."""
        return self.evaluator.terms(elbo, pairs_data)

    def evaluate(self, ref_eval: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """Held-out preference and reward accuracy of the current policy (:class:`.evaluation.PreferenceEval`)."""
        try:
            return self.evaluator.evaluate(self.policy_elbo, self.eval_pairs, ref_eval)
        except NonFiniteELBOError as e:
            raise TrainingDiverged(f"held-out evaluation at step {self.state.step}: {e}; last checkpoint: "
                                   f"{self.checkpoints.latest() or 'none'}") from e

    def evaluate_initial(self) -> dict:
        """Evaluate the initial policy (held-out pairs and graded generations, where there are any); keep the
        reference's eval terms for the reward accuracy."""
        before = {}
        if self.has_eval:
            before, policy_eval = self.evaluate(None)
            self.state.pref_acc_before = before["eval/pref_acc"]
            # A copy of the initial policy (or LoRA's): its terms are the ones just computed.
            self.ref_eval = policy_eval if self.reference_is_initial_policy else self.eval_terms(
                self.ref_elbo, self.eval_pairs)
        generations = grade_generations(self.task, self.accelerator, self.policy_elbo, self.tokenizer,
                                        self.config.gen_eval_prompts)
        if generations is not None:
            self.state.gen_acc_before, self.state.gen_credit_before = generations.accuracy, generations.credit
            before.update(generation_metrics(generations))
        return before

    # --- the run: the loop ----------------------------------------------------------------------

    def train(self) -> dict:
        """Run from the current step to ``max_steps``; return the summary (also in ``summary.json``)."""
        t0 = time.time()
        try:
            with StopSignals() as signals:
                log = self._open_logs()
                if self.resume_path is None and (initial := self.evaluate_initial()):
                    log.log(0, initial)
                if self.config.precompute_ref:
                    self.precompute_reference()
                self._loop(log, signals)
            return self.finish(log, t0)
        finally:
            self.close()

    def _open_logs(self) -> MetricsLogger:
        cfg = self.config
        if self.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.output_dir, "config.json"), json.dumps(vars(cfg), indent=1, default=str))
        return MetricsLogger(cfg.output_dir, self.is_main, cfg.report_to == "tensorboard",
                             self.start_step if self.resume_path else None)

    def _loop(self, log: MetricsLogger, signals: StopSignals):
        bar = tqdm(total=self.max_steps, initial=self.state.step, desc=self.NAME, disable=not self.is_main,
                   dynamic_ncols=True)
        window = LogWindow()
        while self.state.step < self.max_steps:
            if signals.requested(self.accelerator):
                bar.close()
                self._stop_for_signal(log, signals)
            fault_point("step", self.state.step)
            applied, metrics, tokens = self.train_step(self.state.step)
            self.state.step += 1
            self._account(applied, metrics, log)
            if applied:
                self.variances.add(metrics)
            window.add(metrics, tokens)
            bar.update(1)
            if applied:
                bar.set_postfix(**self.progress(metrics, window))
            self._periodic(log, window)
        bar.close()

    def _stop_for_signal(self, log: MetricsLogger, signals: StopSignals):
        """Checkpoint the step reached and raise :class:`~vrpo.errors.Interrupted` saying how to resume."""
        path = self.save_checkpoint()
        log.close()
        raise Interrupted(
            f"{signals.name} at step {self.state.step}/{self.max_steps}; checkpoint: "
            f"{path or 'none (weights not finite)'}. Resume with the same command plus --output_dir "
            f"{self.config.output_dir} --resume_from_checkpoint latest",
            signals.signum,
        )

    def _account(self, applied: bool, metrics: dict, log: MetricsLogger):
        """Update the run state after a step; raise :class:`~vrpo.errors.TrainingDiverged` after too many skips."""
        st, cfg = self.state, self.config
        if applied:
            st.consecutive_nonfinite = 0
            st.last_losses = (st.last_losses + [metrics[self.LOSS_METRIC]])[-max(cfg.logging_steps, 1):]
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
            record = window.record(self.state.skipped_steps)
            record.update(budget.advice_metrics(record, self.schedule.global_batch, self.plan))
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
            return latest
        if not self.weights_finite():
            logger.error("step %d: weights are not finite; no checkpoint written (last: %s)", step, latest or "none")
            return None
        if self._definition is None:
            self._definition = self.run_definition()
        state = {**self.state.to_checkpoint(self.max_steps, self.config.seed), "run": self._definition}
        return self.checkpoints.save(step, state, fault=lambda: fault_point("checkpoint", step),
                                     extra_tensors={"eval_reference.pt": self.ref_eval})

    def finish(self, log: MetricsLogger, t0: float) -> dict:
        """The final evaluation, checkpoint and model, the samples, and ``summary.json``."""
        cfg, st = self.config, self.state
        summary = {"algorithm": cfg.algorithm, "steps": st.step, "skipped_steps": st.skipped_steps}
        if self.has_eval:
            if st.final_eval is None:  # else: resumed from the final checkpoint, evaluated and logged before it
                st.final_eval, _ = self.evaluate(self.ref_eval)
                log.log(st.step, st.final_eval)
            summary.update(pref_acc_before=st.pref_acc_before, pref_acc_after=st.final_eval["eval/pref_acc"],
                           reward_acc_after=st.final_eval.get("eval/reward_acc"))
        generations = grade_generations(self.task, self.accelerator, self.policy_elbo, self.tokenizer,
                                        self.config.gen_eval_prompts)
        if generations is not None:
            log.log(st.step, generation_metrics(generations))
            summary.update(gen_prompts=len(generations.samples), gen_acc_before=st.gen_acc_before,
                           gen_acc_after=generations.accuracy,
                           gen_credit_before=st.gen_credit_before, gen_credit_after=generations.credit)
        self.save_checkpoint()
        model_dir = outputs.save_final_model(self.accelerator, self.policy_elbo, self.tokenizer, cfg.output_dir,
                                             cfg.use_lora, st.step)
        losses = st.last_losses
        summary.update(
            final_loss=sum(losses) / len(losses) if losses else None, wall_s=time.time() - t0,
            output_dir=cfg.output_dir, model_dir=model_dir, logs=os.path.join(cfg.output_dir, "logs"),
            family=self.family.display_name, sampler=self.family.sampler_name,
            estimator={"n_t": self.plan.n_t, "n_yt": self.plan.n_yt, "antithetic": self.plan.antithetic,
                       "estimator": self.plan.estimator, "stratified": self.plan.stratified},
            data=self.data_stats,
            **self.variances.summary(self.schedule.global_batch, self.plan),
        )
        if cfg.num_samples and (self.has_eval or generations is not None):
            summary["samples"] = outputs.answer_samples(self.accelerator, self.policy_elbo, self.tokenizer, cfg,
                                                        self.task is not None, generations, self.eval_pairs,
                                                        self.mask_token_id)
        log.close()
        summary["outputs"] = outputs.output_paths(cfg.output_dir, self.checkpoints.root, cfg.report_to == "tensorboard")
        if self.is_main:
            if plot := outputs.write_plot(cfg.output_dir, summary):
                summary["outputs"]["plot"] = plot
            atomic_write_text(summary["outputs"]["summary"], json.dumps(summary, indent=1))
        self.accelerator.end_training()
        return summary
