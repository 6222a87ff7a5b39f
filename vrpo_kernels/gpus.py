"""The one table of GPU specifications: the kernels' grid sizing, the cost model (tools/roofline.py)
and the planner read it.

Sources (public datasheets and architecture whitepapers, dense figures, SXM boards):

* H100 SXM5 80 GB: NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s bf16, 495 TFLOP/s TF32,
  67 TFLOP/s fp32, 3.35 TB/s HBM3; NVIDIA H100 Tensor Core GPU Architecture whitepaper: 132 SMs.
* H200 SXM 141 GB: NVIDIA H200 Tensor Core GPU datasheet: 989 / 495 / 67 TFLOP/s as the H100 SXM
  (same GH100 die, 132 SMs), 4.8 TB/s HBM3e.
* A100 SXM 80 GB: NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s bf16, 156 TFLOP/s TF32,
  19.5 TFLOP/s fp32, 2.039 TB/s HBM2e; NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs.

Every one of them has 64 resident warps per SM (compute capability 8.0 and 9.0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One GPU model's public peaks. Memory in GB as sold (10^9 bytes); FLOP/s dense (no sparsity)."""

    name: str
    memory_gb: float
    sms: int
    bf16_flops: float  # tensor cores, bf16/fp16 inputs, fp32 accumulation
    tf32_flops: float  # tensor cores, TF32 inputs
    fp32_flops: float  # CUDA cores, IEEE fp32
    bandwidth: float  # HBM bytes/s
    warps_per_sm: int = 64


GPUS = {
    "h100": GPU("H100 SXM 80GB", 80, 132, 989e12, 495e12, 67e12, 3.35e12),
    "h200": GPU("H200 SXM 141GB", 141, 132, 989e12, 495e12, 67e12, 4.8e12),
    "a100": GPU("A100 SXM 80GB", 80, 108, 312e12, 156e12, 19.5e12, 2.039e12),
}


def gpu(name: str) -> GPU:
    """The table's entry for ``name`` (h100, h200, a100); a clear error naming the choices otherwise."""
    if name not in GPUS:
        raise ValueError(f"gpu must be one of {', '.join(GPUS)}, got {name!r}")
    return GPUS[name]
