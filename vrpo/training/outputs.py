"""What a run leaves behind: the trained model, samples of its answers, the list of outputs and the plot."""

from __future__ import annotations

import copy
import json
import os

import torch

from ..files import atomic_write_text
from ..models import family_of, sample, save_mdm
from . import distributed
from .data import TokenizedPairs
from .logs import METRICS_FILE, TENSORBOARD_DIR
from .plots import PLOT_FILE, plot_training, read_metrics
from .signals import fault_point
from .task import GenerationReport

MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"


def save_model(model, tokenizer, path: str):
    """The trained model in its family's checkpoint format, with the tokenizer, under ``path``: a folder
    that ``AutoTokenizer.from_pretrained`` reads without remote code."""
    save_mdm(model, path)
    tokenizer.save_pretrained(path)


def save_final_model(accelerator, policy_elbo, tokenizer, output_dir: str, merge_lora: bool, step: int) -> str:
    """The trained policy (LoRA merged) and the tokenizer under ``<output_dir>/model`` (every process calls it)."""
    accelerator.wait_for_everyone()
    model = distributed.gathered_policy(accelerator, policy_elbo)  # collective when sharded
    path = os.path.join(output_dir, MODEL_DIR)
    fault_point("model", step)
    if accelerator.is_main_process:
        if merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        save_model(model, tokenizer, path)
    accelerator.wait_for_everyone()
    return path


def output_paths(output_dir: str, checkpoints_root: str, tensorboard: bool) -> dict[str, str]:
    """What a run writes, by name: the closing summary lists every one."""
    out = {
        "model": os.path.join(output_dir, MODEL_DIR),
        "checkpoints": checkpoints_root,
        "metrics": os.path.join(output_dir, METRICS_FILE),
        "summary": os.path.join(output_dir, SUMMARY_FILE),
    }
    if tensorboard:
        out["tensorboard"] = os.path.join(output_dir, TENSORBOARD_DIR)
    return out


def write_config(output_dir: str, cfg):
    """``config.json``: every setting of the run, resolved."""
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "config.json"), json.dumps(vars(cfg), indent=1, default=str))


def run_facts(output_dir: str, model_dir: str, family, plan) -> dict:
    """The closing summary's facts of the run: where it wrote, the model's family, the estimator."""
    return dict(
        output_dir=output_dir,
        model_dir=model_dir,
        logs=os.path.join(output_dir, "logs"),
        family=family.display_name,
        sampler=family.sampler_name,
        estimator={
            "n_t": plan.n_t,
            "n_yt": plan.n_yt,
            "antithetic": plan.antithetic,
            "estimator": plan.estimator,
            "stratified": plan.stratified,
        },
    )


def write_summary(output_dir: str, checkpoints_root: str, tensorboard: bool, summary: dict, is_main: bool):
    """Add the outputs to ``summary``; on the main process, draw the plot and write ``summary.json``."""
    summary["outputs"] = output_paths(output_dir, checkpoints_root, tensorboard)
    if is_main:
        if plot := write_plot(output_dir, summary):
            summary["outputs"]["plot"] = plot
        atomic_write_text(summary["outputs"]["summary"], json.dumps(summary, indent=1))


def preference_summary(state) -> dict:
    """The closing summary's held-out preference figures, from the run state (``final_eval``: the last
    evaluation's metrics)."""
    return dict(
        pref_acc_before=state.pref_acc_before,
        pref_acc_after=state.final_eval["eval/pref_acc"],
        reward_acc_after=state.final_eval.get("eval/reward_acc"),
    )


def generation_summary(before, after: GenerationReport, split: str = "test") -> dict:
    """The closing summary's graded-generation figures on ``split``'s prompts: ``before`` (the run state's) and
    ``after``."""
    return dict(
        gen_prompts=len(after.samples),
        gen_split=split,
        gen_acc_before=before.gen_acc_before,
        gen_acc_after=after.accuracy,
        gen_credit_before=before.gen_credit_before,
        gen_credit_after=after.credit,
    )


def write_plot(output_dir: str, summary: dict) -> str | None:
    """``plots/training.png`` from the logged metrics and the summary (main process)."""
    path = os.path.join(output_dir, PLOT_FILE)
    return plot_training(read_metrics(os.path.join(output_dir, METRICS_FILE)), summary, path)


def held_out_samples(
    accelerator, policy_elbo, tokenizer, cfg, eval_pairs: TokenizedPairs, mask_token_id: int
) -> list[dict]:
    """``--num_samples`` held-out pairs' prompts answered by the policy, ungraded (main process; others get [],
    but take part in the forwards when the model is sharded). A graded run's samples are its graded answers."""
    is_main = accelerator.is_main_process
    if not (is_main or distributed.is_sharded(accelerator)):
        return []
    with distributed.root_gathered(accelerator, policy_elbo):
        samples = held_out_answers(
            accelerator.unwrap_model(policy_elbo).model,
            tokenizer,
            eval_pairs,
            mask_token_id,
            cfg.num_samples,
            gen_length=cfg.gen_length,
            steps=cfg.gen_steps,
            block_length=cfg.block_length,
        )
    return samples if is_main else []


@torch.no_grad()
def held_out_answers(
    model,
    tokenizer,
    pairs: TokenizedPairs,
    mask_token_id: int,
    k: int,
    gen_length: int | None = None,
    steps: int | None = None,
    block_length: int | None = None,
    grade=None,
) -> list[dict]:
    """Greedy answers of ``model`` to the prompts of the first ``k`` of ``pairs``, with the sampler of the
    model's family (:func:`vrpo.models.sample`).

    Args:
        pairs: :class:`~vrpo.training.data.TokenizedPairs`; a prompt is its chosen sequence before the response.
        gen_length: tokens generated per prompt (default: the length of the pair's chosen response).
        steps, block_length: see :func:`vrpo.models.generate`.
        grade: optional ``(prompt, answer) -> bool``, recorded as ``"correct"`` (a task's own checker).

    Returns:
        ``[{"prompt": the last user message, "answer": decoded text, ["correct": bool]}]``.
    """
    family = family_of(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(min(k, len(pairs))):
        seq = pairs.sequence(i, 0)
        resp = seq["response_mask"]
        start = int(resp.argmax())
        prompt = torch.as_tensor(seq["input_ids"][:start], dtype=torch.long, device=device)[None]
        length = gen_length or int(resp.sum())
        ids = sample(
            model, prompt, mask_token_id, gen_length=length, steps=steps or length, block_length=block_length or length
        )
        answer = tokenizer.decode(ids[0, start:].tolist(), skip_special_tokens=True).strip()
        record = {"prompt": family.last_user_message(tokenizer.decode(prompt[0].tolist())), "answer": answer}
        if grade is not None:
            record["correct"] = grade(record["prompt"], answer)
        out.append(record)
    model.train(was_training)
    return out
