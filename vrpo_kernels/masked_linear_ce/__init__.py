"""Masked linear cross-entropy: the LM head and the per-token ELBO term in one op.

For every selected row ``i``: ``out[i] = row_weight[i] * log_softmax(hidden[i] @ weight.T + bias)[targets[i]]``,
0 elsewhere; only the selected rows reach a matmul. One entry point, :func:`masked_linear_ce`, three
paths (``impl=``): :mod:`.reference` (``"eager"``), :mod:`.torch_path` (``"torch"``, the CPU path) and
:mod:`.triton_path` (``"triton"``, CUDA), the streamed two through one autograd Function in :mod:`.op`.
:mod:`.gemm` picks the backward's GEMM forms for the installed torch; :mod:`.memory` counts what a call
holds. The design, costs and precision: docs/masked_linear_ce.md.
"""

from .common import DEFAULT_MAX_BUFFER_BYTES
from .memory import WorkingSet, working_set_bytes
from .op import masked_linear_ce
from .reference import masked_linear_ce_eager
from .triton_path import aot_specs

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "WorkingSet",
    "aot_specs",
    "masked_linear_ce",
    "masked_linear_ce_eager",
    "working_set_bytes",
]
