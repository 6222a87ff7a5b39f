"""``python -m vrpo.plan``: does a VRPO run fit on the GPUs, and how long does it take? Answered before renting them.

Takes the same flags and ``--config`` YAML as ``python -m vrpo.train`` (the model may be a checkpoint directory or
its ``config.json`` alone), plus the hardware: ``--num_gpus``, ``--gpu`` (h100, h200, a100), ``--gpu_memory_gb``,
``--distributed`` (ddp, fsdp, zero3) and ``--mfu``. It prints the per-GPU memory, part by part, whether it fits,
and the cost of one optimizer step and of a whole run (the LLaDA 1.5 paper's: 350k pairs, batch 64, n = 8;
Zhu et al. 2025, Section 4 and Appendix B)::

    python -m vrpo.plan --config examples/llada_8b_vrpo.yaml \\
        --model_name_or_path tests/fixtures/llada-8b-instruct-meta/config.json --num_gpus 8 --gpu h100

Parameter, gradient and optimizer bytes are exact: they are counted on the model built on the ``meta`` device
from the checkpoint's config (no weights are read), with FSDP2's per-tensor padding when sharded. Activations,
the fused head's working set and the step time are estimates; their formulas are printed with them.
"""

from __future__ import annotations

import argparse
import sys

from vrpo_kernels.gpus import GPUS

from ..tasks import get_task
from ..training.config import VRPOConfig, parse_config
from ..training.probe import probe_variances
from .facts import model_facts, resolved
from .report import probe_report, report
from .settings import DISTRIBUTED, Setup


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vrpo.plan", add_help=False, description=__doc__.split("\n\n")[0])
    d = Setup()
    p.add_argument("--num_gpus", type=int, default=d.num_gpus, help="GPUs (processes) of the run.")
    p.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS), help="GPU model (peak FLOP/s and memory).")
    p.add_argument("--gpu_memory_gb", type=float, default=None, help="Memory per GPU in GB (default: the GPU's).")
    p.add_argument(
        "--distributed",
        default=None,
        choices=DISTRIBUTED,
        help="ddp, fsdp (examples/accelerate_fsdp.yaml) or zero3 (examples/accelerate_deepspeed_zero3."
        "yaml). Default: fsdp on several GPUs, ddp on one.",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=d.mfu,
        help="Assumed model FLOPs utilisation (model FLOPs, no recomputation, over peak bf16).",
    )
    p.add_argument(
        "--mean_length",
        type=int,
        default=None,
        help="Mean tokens per sequence for the FLOPs (default: --max_length; memory always assumes max_length).",
    )
    p.add_argument(
        "--response_fraction",
        type=float,
        default=d.response_fraction,
        help="Fraction of a sequence's tokens that are the response.",
    )
    p.add_argument(
        "--run_pairs", type=int, default=d.run_pairs, help="Training pairs of the whole run (the paper: 350k)."
    )
    p.add_argument(
        "--probe_steps",
        type=int,
        default=0,
        help="Also run the first K training steps on the run's "
        "model and data (CPU is fine; nothing is saved) and print the budget advisor's advice: the "
        "score's mask and pair variances and the n_t of least score noise at the run's forward passes "
        "(and the loss-error criterion's choice, for comparison).",
    )
    p.add_argument(
        "--reserve_gb",
        type=float,
        default=d.reserve_gb,
        help="GB per GPU kept for the CUDA context, communication buffers and fragmentation.",
    )
    return p


def parse(argv: list[str]) -> tuple[VRPOConfig, Setup, int]:
    """``(training config, plan setup, --probe_steps)`` from the command line; ``--help`` shows both sets of flags."""
    parser = _plan_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nTraining flags (the same as python -m vrpo.train):")
        parse_config(["--help"])
    ns, rest = parser.parse_known_args(argv)
    cfg = parse_config(rest)
    values = vars(ns)
    probe_steps = values.pop("probe_steps")
    if probe_steps < 0:
        parser.error(f"--probe_steps must be >= 0, got {probe_steps}")
    values["distributed"] = ns.distributed or ("fsdp" if ns.num_gpus > 1 else "ddp")
    try:
        setup = Setup(**values)
    except ValueError as e:
        parser.error(str(e))
    return cfg, setup, probe_steps


def main(argv: list[str] | None = None) -> int:
    cfg, setup, probe_steps = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        facts = model_facts(resolved(cfg))
    except (FileNotFoundError, ValueError) as e:
        print(f"vrpo.plan: error: {e}", file=sys.stderr)
        return 2
    print(report(resolved(cfg), facts, setup))
    if probe_steps:
        try:
            found = probe_variances(cfg, probe_steps, get_task(cfg.task))
        except (FileNotFoundError, ValueError) as e:
            print(f"vrpo.plan: error: {e}", file=sys.stderr)
            return 2
        print(probe_report(found))
    return 0
