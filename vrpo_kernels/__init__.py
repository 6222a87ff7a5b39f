"""Fused kernels for VRPO on masked diffusion LMs.

One entry point per op, each with an ``impl=`` switch (``"auto"``, ``"triton"``, ``"torch"``, and
``"eager"`` for the first and last; see :mod:`vrpo_kernels.dispatch`):

* :func:`masked_linear_ce`: LM head + weighted log-prob of the target, only on masked rows;
* :func:`sample_masks`: the diffusion masks for the ELBO samples;
* :func:`bidirectional_attention`: non-causal attention over packed variable-length rows.
"""

from .attention import bidirectional_attention
from .dispatch import resolve_impl, triton_available
from .mask_sampling import sample_masks
from .masked_linear_ce import masked_linear_ce

__all__ = ["bidirectional_attention", "masked_linear_ce", "sample_masks", "resolve_impl", "triton_available"]
