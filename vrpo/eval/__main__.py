"""``python -m vrpo.eval``: run lm-evaluation-harness with the ``vrpo`` model and print its results table.

    python -m vrpo.eval --model_name_or_path vrpo/tasks/sort/data/sft_model --tasks vrpo_sort_mc,vrpo_sort_gen \\
        --apply_chat_template --model_args gen_length=16 --limit 64

The shipped tasks (:data:`vrpo.eval.TASKS_DIRS`) are always included; ``--include_path`` adds more. Under
``accelerate launch`` each process evaluates its share of the documents; the first prints and saves.
"""

from __future__ import annotations

import argparse
import sys

from lm_eval import simple_evaluate
from lm_eval.loggers import EvaluationTracker
from lm_eval.utils import make_table, simple_parse_args_string

from . import VRPOEvalLM, attach_stats, task_manager


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vrpo.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", required=True, help="checkpoint directory (any supported family)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include_path", action="append", default=[], help="a directory of task YAMLs (repeatable)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--batch_size", type=int, default=32, help="requests per forward (default 32)")
    p.add_argument("--output_path", default=None, help="where lm-eval writes results (and samples)")
    p.add_argument(
        "--apply_chat_template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="format prompts with the tokenizer's chat template (a model trained by vrpo needs it); off by "
        "default, with a warning when the tokenizer has one; --no-apply_chat_template: raw prompts, "
        "no warning",
    )
    p.add_argument("--model_args", default="", help="k=v,... for the vrpo model (mc_num, gen_length, ...)")
    p.add_argument(
        "--log_samples",
        action="store_true",
        help="save every request's output, with the ELBO's "
        "standard error and sample count (field 'vrpo'); needs --output_path",
    )
    args = p.parse_args(argv)
    if args.log_samples and not args.output_path:
        p.error("--log_samples needs --output_path")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def build_model(args) -> VRPOEvalLM:
    extra = simple_parse_args_string(args.model_args) if args.model_args else {}
    if "pretrained" in extra:
        raise ValueError("--model_args pretrained=...: give the checkpoint as --model_name_or_path")
    return VRPOEvalLM(pretrained=args.model_name_or_path, batch_size=args.batch_size, **extra)


def chat_template_warning(args, tokenizer) -> str | None:
    """The warning to print when the prompts go to the model as raw text although its tokenizer has a chat
    template (``--apply_chat_template`` not given), else None. Every vrpo training run formats its prompts
    with the chat template, and such a model answers raw prompts badly (docs/evaluation.md)."""
    if args.apply_chat_template is not None or not getattr(tokenizer, "chat_template", None):
        return None
    return (
        f"vrpo.eval: warning: the tokenizer of {args.model_name_or_path} has a chat template, but "
        "--apply_chat_template is off, so the prompts reach the model as raw text. A model trained on "
        "chat-formatted prompts (every vrpo training run is) answers at chance or worse that way. Pass "
        "--apply_chat_template, or --no-apply_chat_template to evaluate raw prompts without this warning."
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        lm = build_model(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vrpo.eval: error: {e}", file=sys.stderr)
        return 2
    if warning := chat_template_warning(args, lm.tokenizer):
        print(warning, file=sys.stderr)
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    results = simple_evaluate(
        model=lm,
        tasks=args.tasks.split(","),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=args.log_samples,
        apply_chat_template=bool(args.apply_chat_template),
        task_manager=task_manager(args.include_path),
        evaluation_tracker=tracker,
    )
    gathered = lm.gather_object((lm.sample_stats, lm.estimator.sequences))  # every process must take part
    if results is None:  # not the first process
        return 0
    sequences = sum(n for _, n in gathered)
    if args.log_samples:
        stats = {k: v for part, _ in gathered for k, v in part.items()}
        samples = attach_stats(results.pop("samples"), stats)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples if args.log_samples else None)
        if args.log_samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(
        f"vrpo ({args.model_name_or_path}, {args.model_args or 'default settings'}), limit: {args.limit}, "
        f"num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}, "
        f"processes: {lm.world_size}, likelihood forward sequences: {sequences}"
    )
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
