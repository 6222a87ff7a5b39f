"""The plan's own settings (the hardware and the run) and one line of its output."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo_kernels.gpus import GPUS

DISTRIBUTED = ("ddp", "fsdp", "zero3")


# --- the hardware and the run --------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The plan's own settings (the training settings are the :class:`~vrpo.training.config.VRPOConfig`)."""

    num_gpus: int = 1
    gpu: str = "h100"
    gpu_memory_gb: float | None = None  # default: the GPU's
    distributed: str = "fsdp"  # ddp (also one GPU), fsdp (accelerate FSDP2) or zero3 (DeepSpeed)
    mfu: float = 0.35
    mean_length: int | None = None  # tokens per sequence for the FLOPs (default: --max_length)
    response_fraction: float = 0.5  # of a sequence's tokens, the response
    run_pairs: int = 350_000
    reserve_gb: float = 2.0  # CUDA context, NCCL buffers, allocator fragmentation

    def __post_init__(self):
        if self.num_gpus < 1:
            raise ValueError(f"--num_gpus must be >= 1, got {self.num_gpus}")
        if self.gpu not in GPUS:
            raise ValueError(f"--gpu must be one of {', '.join(GPUS)}, got {self.gpu!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"--distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")
        if not 0 < self.response_fraction <= 1:
            raise ValueError(f"--response_fraction must be in (0, 1], got {self.response_fraction}")
        for name in ("mean_length", "run_pairs", "gpu_memory_gb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be > 0, got {value}")

    @property
    def shards(self) -> int:
        """Ranks the policy's parameters, gradients and optimizer state are split over."""
        return 1 if self.distributed == "ddp" else self.num_gpus

    @property
    def capacity(self) -> int:
        gb = self.gpu_memory_gb if self.gpu_memory_gb is not None else GPUS[self.gpu].memory_gb
        return int(gb * 1e9)


@dataclass(frozen=True)
class Item:
    """One line of the plan: a name, bytes (or FLOPs, seconds...) and how it was obtained."""

    name: str
    value: float
    how: str
