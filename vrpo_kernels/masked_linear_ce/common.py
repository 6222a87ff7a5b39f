"""Constants shared by the paths of :func:`vrpo_kernels.masked_linear_ce`."""

from __future__ import annotations

import torch

#: Default of ``masked_linear_ce(max_buffer_bytes=None)``: the largest logits buffer the op may hold
#: (what else it holds is :func:`vrpo_kernels.masked_linear_ce.memory.working_set_bytes`).
DEFAULT_MAX_BUFFER_BYTES = 1 << 30

# The running max starts here, not at -inf: a row whose first tile is all -inf (a -inf bias on padded
# vocabulary) would otherwise compute exp(-inf - -inf) = NaN. Every finite logit is >= this floor.
FLOOR = -torch.finfo(torch.float32).max

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
ELEMENT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
