"""Launch configurations: tile sizes per GPU and head dim."""

from __future__ import annotations

import dataclasses

import torch

from ..dispatch import interpreting, triton_available

if triton_available():
    import triton

else:  # pragma: no cover - platforms without triton wheels
    triton = None


# --------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. block_m: queries per tile, block_n: keys per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    fwd: KernelConfig
    delta: KernelConfig  # block_n unused
    dkdv: KernelConfig
    dq: KernelConfig


# Hopper (sm_90), float16/bfloat16, keyed by the padded head dim. Chosen with the ptxas report of
# `aot_specs()` (0 spill bytes, shared memory under 227 KB, and some register headroom: configs at
# the 255-register cap were passed over); tests/test_aot.py checks every one of them.
_SM90_CONFIGS = {
    64: AttentionConfig(
        fwd=KernelConfig(128, 64, 8, 3),
        delta=KernelConfig(128, 0, 4, 1),
        dkdv=KernelConfig(64, 128, 8, 3),
        dq=KernelConfig(128, 64, 8, 3),
    ),
    128: AttentionConfig(
        fwd=KernelConfig(128, 64, 8, 3),
        delta=KernelConfig(64, 0, 4, 1),
        dkdv=KernelConfig(32, 128, 8, 3),
        dq=KernelConfig(128, 64, 8, 2),
    ),
}
# Other GPUs: smaller tiles and two stages, which fit the ~100 KB of shared memory
# of consumer parts. Correct everywhere, tuned nowhere.
_GENERIC_CONFIG = AttentionConfig(
    fwd=KernelConfig(64, 32, 4, 2),
    delta=KernelConfig(64, 0, 4, 1),
    dkdv=KernelConfig(32, 64, 4, 2),
    dq=KernelConfig(64, 32, 4, 2),
)
# The interpreter runs one program at a time, so fewer, larger tiles are faster; query and key
# tiles differ so that the tests cover unequal block sizes.
_INTERPRETER_CONFIG = AttentionConfig(
    fwd=KernelConfig(32, 16, 4, 1),
    delta=KernelConfig(32, 0, 4, 1),
    dkdv=KernelConfig(16, 32, 4, 1),
    dq=KernelConfig(32, 16, 4, 1),
)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def attention_config(head_dim: int, device: torch.device) -> AttentionConfig:
    """The tiles the Triton path uses for this head dim on this device (float16/bfloat16 on a GPU)."""
    if interpreting() or device.type != "cuda":
        return _INTERPRETER_CONFIG
    major, _ = torch.cuda.get_device_capability(device)
    return sm90_config(head_dim) if major == 9 else _GENERIC_CONFIG


def sm90_config(head_dim: int) -> AttentionConfig:
    """The Hopper tiles for this head dim (16 and 32 use the 64 tiles)."""
    return _SM90_CONFIGS[max(_block_d(head_dim), 64)]
