"""What the trainer does differently when the policy is sharded (FSDP2 through accelerate, DeepSpeed ZeRO-3).

* The frozen reference is sharded exactly like the policy under FSDP2 (accelerate's own ``fsdp2_prepare_model``
  with the run's plugin: one unit per decoder layer, the root holding embeddings, norm and head), but is not
  registered with accelerate, so checkpoints never hold it. Under DeepSpeed and FSDP1 it stays whole on every
  device (``--precompute_ref`` then frees it after one pass); that is logged once.
* Every forward of a sharded model is collective: every process must make the same calls (evaluation shares
  are padded, samples are generated on every process). GRPO's rollouts differ between processes, so they run
  with the whole policy gathered (:func:`fully_gathered`).
* The final model is gathered (collectively) to the main process's CPU and saved from a plain copy.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft import get_peft_model
from torch import nn
from torch.distributed.fsdp import FSDPModule

logger = logging.getLogger("vrpo")


def is_sharded(accelerator) -> bool:
    """True when the policy's parameters are split across processes (FSDP or DeepSpeed)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def place_reference(accelerator, ref_elbo: nn.Module) -> nn.Module:
    """The frozen reference's ELBO module on the run's devices: sharded like the policy under FSDP2, else whole."""
    ref_elbo.eval().requires_grad_(False)
    if getattr(accelerator, "is_fsdp2", False):
        ref_elbo = fsdp2_prepare_model(accelerator, ref_elbo)
        # No backward follows its forwards: free the gathered root at once, not at the next backward.
        ref_elbo.set_reshard_after_forward(True)
        if accelerator.is_main_process:
            logger.info("reference sharded like the policy (FSDP2, %d processes)", accelerator.num_processes)
        return ref_elbo
    if is_sharded(accelerator):
        logger.warning(
            "the frozen reference is kept whole on every device under %s (only FSDP2 shards it); "
            "--precompute_ref frees it after one pass",
            accelerator.distributed_type,
        )
    return ref_elbo.to(accelerator.device)


def _plain_class(module: nn.Module) -> type:
    """The model's own class (FSDP2 swaps a sharded module's class for an ``FSDP<class>`` subclass)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _empty_like_model(model: nn.Module) -> nn.Module:
    """A model of the same class and config (LoRA adapters included) with parameters on the meta device."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    with torch.device("meta"):
        empty = _plain_class(base)(base.config)
    if hasattr(model, "peft_config"):
        empty = get_peft_model(empty, model.peft_config["default"])
    return empty


def gathered_policy(accelerator, policy_elbo: nn.Module) -> nn.Module | None:
    """The trained policy LM with full weights: on the main process, ``None`` elsewhere.

    Unsharded runs return the model itself. Sharded runs gather the weights to the main process's CPU
    (every process must call this) and load them into a copy of the model.
    """
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(policy_elbo).model if accelerator.is_main_process else None
    state = accelerator.get_state_dict(policy_elbo)  # collective; full tensors on the main process
    if not accelerator.is_main_process:
        return None
    model = accelerator.unwrap_model(policy_elbo).model
    copy = _empty_like_model(model)
    copy.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True, assign=True)
    return copy


def balanced_share(n_items: int, rank: int, world: int) -> tuple[list[int], int]:
    """``(indices, real)``: this process's strided share of ``n_items``, padded (with its own or item 0's index)
    to the same length on every process; only the first ``real`` are its own."""
    mine = list(range(rank, n_items, world))
    real = len(mine)
    rounds = -(-n_items // world)
    return mine + [mine[-1] if mine else 0] * (rounds - real), real


@contextlib.contextmanager
def root_gathered(accelerator, policy_elbo: nn.Module):
    """Calls that bypass the root module's forward (generation calls the LM inside the ELBO module) need the
    root's parameters (embeddings, norm, head) gathered under FSDP2; decoder layers gather themselves."""
    if not getattr(accelerator, "is_fsdp2", False):
        yield
        return
    _init_as_root(policy_elbo)
    policy_elbo.unshard()
    try:
        yield
    finally:
        policy_elbo.reshard()


def _init_as_root(policy_elbo: nn.Module):
    """FSDP2 makes the first unit to run a forward the root; a call on the LM inside the ELBO module (the
    sampler's) before any forward of the module itself would make a decoder layer the root (a resumed run
    can sample before its first step). FSDP2 has no public call for this; the private one is idempotent."""
    policy_elbo._get_fsdp_state()._lazy_init()


@contextlib.contextmanager
def fully_gathered(accelerator, policy_elbo: nn.Module):
    """Every FSDP2 unit of the policy gathered for the block, so that its forwards make no collective call.

    For forwards whose number differs between processes: each process samples rollouts for its own prompts,
    and a prompt's answer length sets the sampler's steps. Costs one whole copy of the policy on every device
    while the block runs. Collective on entry and exit: every process must enter it."""
    if not getattr(accelerator, "is_fsdp2", False):
        yield
        return
    _init_as_root(policy_elbo)
    units = [m for m in policy_elbo.modules() if isinstance(m, FSDPModule)]
    # Each unit's own setting, restored after: they differ (the root and accelerate's head group keep their
    # parameters after forward, the layers do not). FSDP2 has no public getter; this reads its param groups.
    before = [
        (u, any(g.post_forward_mesh_info is not None for g in u._get_fsdp_state()._fsdp_param_groups)) for u in units
    ]
    policy_elbo.set_reshard_after_forward(False)  # recursive: each unit keeps its gathered parameters
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in before:
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def raise_everywhere(accelerator, error: BaseException | None):
    """Raise the main process's ``error`` (None: no error) on every process: the main process re-raises it,
    the others raise a RuntimeError that carries its message. Without this the others would wait at the
    next collective until the launcher's timeout. Collective: every process must call it."""
    message = None
    if accelerator.num_processes > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        broadcast_object_list(box, from_process=0)  # our own processes' strings, not a file's bytes
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"the main process stopped the run: {message}")


def check_supported(accelerator):
    """Refuse DeepSpeed before anything is loaded: the trainer does not run under it yet
    (docs/training.md, Scaling out)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "DeepSpeed is not supported by vrpo.train yet: its engine steps the optimizer inside backward, "
            "which bypasses VRPO's gradient accumulation and its skipping of non-finite steps, and it needs a "
            "dataloader the trainer does not use. Launch with examples/accelerate_fsdp.yaml (FSDP2) instead"
        )


def mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes (one reduce for all of them)."""
    if accelerator.num_processes == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    t = accelerator.reduce(
        torch.tensor([metrics[k] for k in keys], device=accelerator.device, dtype=torch.float64), "mean"
    )
    return dict(zip(keys, t.tolist()))


def all_finite(accelerator, params) -> bool:
    """All of ``params`` are finite, on every process: one fused norm per device (it reads the weights once;
    no copy). Sharded (FSDP2 DTensor) weights: each process checks its own shard; the reduce joins them."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    norms = torch._foreach_norm([t.detach() for t in local])
    bad = (~torch.isfinite(torch.stack(norms))).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() == 0)
