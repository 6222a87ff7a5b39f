"""``VRPOTrainer``: the loop around the library's maths (sampling, ELBO, loss).

One optimizer step:

1. take this process's share of the step's global batch of pairs (a seeded permutation per epoch);
2. draw masks for every chosen and rejected sequence, keyed by ``(seed, epoch, pair, side)`` so a
   draw never depends on batching, padding, process count or resumption;
3. run the policy on its draws (with gradients) and the reference on the same draws (antithetic) or
   fresh ones, under ``inference_mode``; chosen and rejected go through in one batch;
4. VRPO loss (+ the SFT term), backward, gradient accumulation, clipping;
5. skip the step if the loss or gradient norm is not finite; stop after too many in a row.

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
import time

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, atomic_write_text
from .config import VRPOConfig
from .elbo import ELBOModule, NonFiniteELBOError
from .losses import mdm_sft_loss, vrpo_loss
from .sampling import SamplingPlan, draw_key, draw_masks_keyed

logger = logging.getLogger("vrpo")

CHOSEN, REJECTED = 0, 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def fault_point(name: str, step: int):
    """Test hook: ``VRPO_KILL_AT=<name>:<step>`` sends SIGKILL to this process at that point."""
    spec = os.environ.get("VRPO_KILL_AT")
    if spec and spec == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(kept))
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


class VRPOTrainer:
    """Train a masked diffusion LM with VRPO.

    Args:
        config: the run's :class:`~vrpo.config.VRPOConfig` (``None`` fields are resolved).
        model, ref_model, tokenizer: optional objects to use instead of loading them from the config
            (the API route; the command line loads them).
        train_pairs, eval_pairs: optional :class:`~vrpo.data.TokenizedPairs`.
    """

    def __init__(self, config: VRPOConfig, model=None, ref_model=None, tokenizer=None, train_pairs=None, eval_pairs=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = cfg = config.resolved()
        self.plan = cfg.sampling_plan()
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision)
        set_seed(cfg.seed)
        self.is_main = acc.is_main_process

        # Everything that can be wrong with the data or the model is found before anything is written.
        from . import loading

        self.tokenizer = tokenizer if tokenizer is not None else loading.load_tokenizer(cfg)
        self.mask_token_id = loading.mask_token_id(cfg, self.tokenizer)
        if train_pairs is None:
            train_pairs, eval_pairs, self.data_stats = loading.load_pairs(cfg, self.tokenizer)
        else:
            self.data_stats = {}
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        world = acc.num_processes
        self.local_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.global_batch = self.local_batch * world
        self.steps_per_epoch = len(train_pairs) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(train_pairs)} training pairs do not fill one global batch of {self.global_batch} "
                f"(per-device batch x processes x accumulation); lower --per_device_train_batch_size"
            )
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch * cfg.num_train_epochs

        self.resume_path = None
        self.checkpoints = CheckpointManager(cfg.output_dir, acc, cfg.save_total_limit)
        if cfg.resume_from_checkpoint:
            self.resume_path = self.checkpoints.resolve(cfg.resume_from_checkpoint)
        elif self.checkpoints.complete() and not cfg.overwrite_output_dir:
            raise FileExistsError(
                f"--output_dir {cfg.output_dir} already holds checkpoints; pass --resume_from_checkpoint latest "
                "to continue that run or --overwrite_output_dir to start over"
            )

        policy = model if model is not None else loading.load_policy(cfg)
        if ref_model is None and not cfg.use_lora:
            ref_model = loading.load_reference(cfg, policy)
        if cfg.use_lora:
            policy = loading.add_lora(cfg, policy)
        if cfg.gradient_checkpointing:
            # transformers renamed it; the checkpoint kwargs come first under both names
            enable = getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)
            enable({"use_reentrant": False})
        policy.train()
        self.policy = policy
        fused = "auto" if cfg.fused_head else False
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        )
        from transformers import get_scheduler

        # The scheduler is stepped by hand once per optimizer step (accelerate would step it once per
        # process), and saved with the checkpoints.
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, self.max_steps)
        pack = cfg.max_length if cfg.packing else None
        self.policy_elbo, self.optimizer = acc.prepare(
            ELBOModule(policy, self.mask_token_id, fused, cfg.kernel_impl, pack_length=pack), optimizer
        )
        acc.register_for_checkpointing(self.scheduler)
        self.ref_elbo = None
        if ref_model is not None:
            # Not handed to accelerate: it has no gradients to synchronise, and its frozen weights
            # must not be written into every checkpoint. Under FSDP/DeepSpeed it stays whole per device.
            ref_model.eval().requires_grad_(False).to(acc.device)
            self.ref_elbo = ELBOModule(ref_model, self.mask_token_id, fused, cfg.kernel_impl, pack_length=pack)
        self.ref_cache: dict[tuple[int, int], torch.Tensor] = {}

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

    def keyed_draw(self, batch, items, stream: str, plan: SamplingPlan | None = None):
        keys = [draw_key(self.config.seed, stream, e, i, side) for side in (CHOSEN, REJECTED) for e, i in items]
        return draw_masks_keyed(batch["response_mask"], plan or self.plan, keys)

    def reference_terms(self, batch, items, policy_draw):
        """float32 [2B, n] reference terms on the same draw (antithetic) or a fresh one, and whether
        the reference model ran (False when the terms were precomputed)."""
        cached = [self.ref_cache.get(item) for item in items]
        if all(c is not None for c in cached):
            terms = torch.cat([torch.stack([c[0] for c in cached]), torch.stack([c[1] for c in cached])])
            return terms.to(self.accelerator.device), False
        draw = policy_draw if self.plan.antithetic else self.keyed_draw(batch, items, "ref")
        with torch.inference_mode(), self.accelerator.autocast():
            if self.ref_elbo is not None:
                terms = self.ref_elbo(batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"])
            else:  # LoRA: the reference is the policy with its adapters off
                with self.accelerator.unwrap_model(self.policy_elbo).model.disable_adapter():
                    terms = self.accelerator.unwrap_model(self.policy_elbo)(
                        batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"]
                    )
        return terms.clone(), True  # clone: an ordinary tensor, usable next to autograd ones

    def precompute_reference(self):
        """Reference terms for every (epoch, pair) this process will train on, then free the reference."""
        todo = sorted({item for step in range(self.start_step, self.max_steps) for item in self.step_pairs(step)})
        size = self.config.per_device_train_batch_size
        bar = tqdm(range(0, len(todo), size), desc="reference ELBOs", disable=not self.is_main)
        for i in bar:
            items = todo[i : i + size]
            batch = self.batch_of(self.train_pairs, items)
            terms = self.reference_terms(batch, items, self.keyed_draw(batch, items, "train"))[0].cpu()
            B = len(items)
            for b, item in enumerate(items):
                self.ref_cache[item] = torch.stack([terms[b], terms[B + b]])
        self.ref_elbo = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- one step -----------------------------------------------------------------------------

    def grouped(self, terms: torch.Tensor) -> torch.Tensor:
        """[B, n] -> [B, n_t]: the n_yt masks of a timestep are averaged, so that samples are
        independent for the ``score/var`` estimate (the mean, hence the loss, is unchanged)."""
        return terms.view(terms.shape[0], self.plan.n_t, self.plan.n_yt).mean(-1)

    def loss_on(self, items):
        cfg = self.config
        batch = self.batch_of(self.train_pairs, items)
        draw = self.keyed_draw(batch, items, "train")
        policy_terms = self.policy_elbo(batch["input_ids"], batch["response_mask"], draw, attention_mask=batch["attention_mask"])
        ref_terms, ref_ran = self.reference_terms(batch, items, draw)
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

    def train_step(self, step: int) -> tuple[bool, dict, int]:
        """One optimizer step. Returns (applied, metrics, tokens processed)."""
        acc, cfg = self.accelerator, self.config
        micro = self.micro_batches(step)
        sums: dict[str, float] = {}
        tokens, bad = 0, False
        for k, items in enumerate(micro):
            sync = k == len(micro) - 1
            ctx = acc.no_sync(self.policy_elbo) if not sync else contextlib.nullcontext()
            with ctx:
                try:
                    loss, metrics, n_tok = self.loss_on(items)
                except NonFiniteELBOError as e:
                    logger.warning("step %d: %s", step, e)
                    bad = True
                    # Every process must still run backward (DDP), so backward a zero.
                    loss = sum(p.sum() for p in self.policy_elbo.parameters() if p.requires_grad) * 0.0
                    metrics, n_tok = {}, 0
                if not torch.isfinite(loss.detach()):
                    bad = True
                acc.backward(loss / len(micro))
            tokens += n_tok
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v) / len(micro)
        params = [p for p in self.policy_elbo.parameters() if p.requires_grad]
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        flag = torch.tensor([1.0 if bad or not torch.isfinite(torch.as_tensor(grad_norm)) else 0.0], device=acc.device)
        bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = dict(sums)
        if acc.num_processes > 1 and metrics:
            keys = sorted(metrics)
            t = acc.reduce(torch.tensor([metrics[k] for k in keys], device=acc.device, dtype=torch.float64), "mean")
            metrics = dict(zip(keys, t.tolist()))
        metrics["grad_norm"] = float(grad_norm)
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        return not bad, metrics, tokens

    # --- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def eval_terms(self, elbo, pairs_data) -> torch.Tensor:
        """float32 [N, 2, n] ELBO terms of every eval pair under a fixed, stratified draw."""
        plan = SamplingPlan(n_t=self.config.eval_n_t, stratified=True, estimator=self.config.estimator)
        acc = self.accelerator
        N = len(pairs_data)
        mine = list(range(acc.process_index, N, acc.num_processes))
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
            B = len(items)
            idx = torch.tensor([j for _, j in items], device=acc.device)
            out[idx, 0], out[idx, 1] = terms[:B].float(), terms[B:].float()
        elbo.train(was_training)
        return acc.reduce(out, reduction="sum") if acc.num_processes > 1 else out

    def evaluate(self, ref_eval: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """Held-out preference accuracy: the policy's ELBO margin > 0, and (given the reference's
        terms) the implicit reward margin > 0."""
        policy = self.eval_terms(self.accelerator.unwrap_model(self.policy_elbo), self.eval_pairs)
        est = policy.mean(-1)
        metrics = {"eval/pref_acc": (est[:, 0] > est[:, 1]).float().mean().item()}
        if ref_eval is not None:
            ref = ref_eval.to(est.device).mean(-1)
            margin = (est[:, 0] - ref[:, 0]) - (est[:, 1] - ref[:, 1])
            metrics["eval/reward_acc"] = (margin > 0).float().mean().item()
            metrics["eval/reward_margin"] = (self.config.beta * margin).mean().item()
        return metrics, policy

    # --- the run --------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, acc = self.config, self.accelerator
        t0 = time.time()
        self.start_step = 0
        st: dict = {"skipped_steps": 0, "consecutive_nonfinite": 0, "last_losses": []}
        ref_eval = None
        if self.resume_path:
            loaded = self.checkpoints.load(self.resume_path)
            self.start_step = loaded["step"]
            st.update({k: loaded[k] for k in st if k in loaded})
            st["pref_acc_before"] = loaded.get("pref_acc_before")
            extra = os.path.join(self.resume_path, "eval_reference.pt")
            ref_eval = torch.load(extra) if os.path.exists(extra) else None
            if self.is_main:
                logger.info("resumed from %s at step %d", self.resume_path, self.start_step)
        if self.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.output_dir, "config.json"), json.dumps(vars(cfg), indent=1, default=str))
        log = MetricsLogger(cfg.output_dir, self.is_main, cfg.report_to == "tensorboard", self.start_step if self.resume_path else None)

        if self.resume_path is None and self.eval_pairs is not None and len(self.eval_pairs):
            before, policy_eval = self.evaluate(None)
            st["pref_acc_before"] = before["eval/pref_acc"]
            if self.ref_elbo is not None and cfg.ref_model_name_or_path:
                ref_eval = self.eval_terms(self.ref_elbo, self.eval_pairs)
            else:  # the reference is the initial policy: its terms are the ones just computed
                ref_eval = policy_eval
            log.log(0, before)
        if cfg.precompute_ref:
            self.precompute_reference()

        bar = tqdm(total=self.max_steps, initial=self.start_step, desc="VRPO", disable=not self.is_main, dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        tok_count, tok_t0 = 0, time.time()
        step = self.start_step
        while step < self.max_steps:
            fault_point("step", step)
            applied, metrics, tokens = self.train_step(step)
            step += 1
            tok_count += tokens
            if applied:
                st["consecutive_nonfinite"] = 0
                st["last_losses"] = (st["last_losses"] + [metrics["loss/vrpo"]])[-max(cfg.logging_steps, 1):]
            else:
                st["skipped_steps"] += 1
                st["consecutive_nonfinite"] += 1
                if self.is_main:
                    logger.warning("step %d skipped: non-finite loss or gradient norm", step)
                log.log(step, {"train/skipped": 1, "train/consecutive_nonfinite": st["consecutive_nonfinite"]})
                if st["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
                    last = self.checkpoints.latest()
                    raise TrainingDiverged(
                        f"{st['consecutive_nonfinite']} consecutive steps had a non-finite loss or gradient norm "
                        f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}); stopping at step {step}. "
                        f"Last good checkpoint: {last or 'none'}"
                    )
            for key, v in metrics.items():
                window.setdefault(key, []).append(v)
            bar.update(1)
            if applied:
                elapsed = max(time.time() - tok_t0, 1e-9)
                bar.set_postfix(loss=f"{metrics['loss/vrpo']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                                tok_s=f"{tok_count / elapsed:.0f}")
            if step % cfg.logging_steps == 0 or step == self.max_steps:
                record = {k: sum(v) / len(v) for k, v in window.items() if v and all(math.isfinite(x) for x in v)}
                record["train/tokens_per_s"] = tok_count / max(time.time() - tok_t0, 1e-9)
                record["train/skipped_steps"] = st["skipped_steps"]
                log.log(step, record)
                window, tok_count, tok_t0 = {}, 0, time.time()
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.max_steps and self.eval_pairs is not None:
                log.log(step, self.evaluate(ref_eval)[0])
            if cfg.save_steps and step % cfg.save_steps == 0 and step < self.max_steps:
                self.save_checkpoint(step, st, ref_eval)
        bar.close()

        summary = {"steps": step, "skipped_steps": st["skipped_steps"]}
        if self.eval_pairs is not None and len(self.eval_pairs):
            after, _ = self.evaluate(ref_eval)
            log.log(step, after)
            summary.update(pref_acc_before=st.get("pref_acc_before"), pref_acc_after=after["eval/pref_acc"],
                           reward_acc_after=after.get("eval/reward_acc"))
        self.save_checkpoint(step, st, ref_eval)
        model_dir = self.save_final_model()
        losses = st["last_losses"]
        summary.update(
            final_loss=sum(losses) / len(losses) if losses else None,
            wall_s=time.time() - t0,
            output_dir=cfg.output_dir,
            model_dir=model_dir,
            logs=os.path.join(cfg.output_dir, "logs"),
            estimator={"n_t": self.plan.n_t, "n_yt": self.plan.n_yt, "antithetic": self.plan.antithetic,
                       "estimator": self.plan.estimator, "stratified": self.plan.stratified},
            data=self.data_stats,
        )
        if cfg.num_samples and self.eval_pairs is not None and len(self.eval_pairs):
            from .loading import sample_answers

            summary["samples"] = sample_answers(self, cfg.num_samples)
        if self.is_main:
            atomic_write_text(os.path.join(cfg.output_dir, "summary.json"), json.dumps(summary, indent=1))
        log.close()
        acc.end_training()
        return summary

    def save_checkpoint(self, step: int, st: dict, ref_eval):
        def fault():
            fault_point("checkpoint", step)

        state = {"step": step, "max_steps": self.max_steps, "seed": self.config.seed, **st}
        path = self.checkpoints.save(step, state, fault=fault, extra_tensors={"eval_reference.pt": ref_eval})
        return path

    def save_final_model(self) -> str | None:
        from .models import save_llada

        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.policy_elbo).model
        path = os.path.join(self.config.output_dir, "model")
        if acc.is_main_process:
            if self.config.use_lora:
                model = copy.deepcopy(model).merge_and_unload()
            save_llada(model, path)
            self.tokenizer.save_pretrained(path)
        acc.wait_for_everyone()
        return path


