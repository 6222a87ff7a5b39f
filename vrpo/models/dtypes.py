"""The one table of dtype names: config files (``torch_dtype``), ``--torch_dtype`` and ``load_mdm(dtype=...)``."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# safetensors header dtype -> torch dtype, for the float types a checkpoint may hold.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def resolve_dtype(dtype, where: str = "dtype") -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype, a name in :data:`DTYPES` (``"torch."`` prefix allowed) or None/"auto"
    (None: keep what is stored). Raises ``ValueError`` naming ``where`` otherwise."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{where}={dtype!r} is not a torch dtype, 'auto' or one of {sorted(DTYPES)}")
