"""Masked linear cross-entropy: the LM head and the per-token ELBO term in one op.

For every selected row ``i``: ``out[i] = row_weight[i] * log_softmax(hidden[i] @ weight.T + bias)[targets[i]]``;
unselected rows give 0.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_impl


def masked_linear_ce_eager(hidden, weight, targets, row_weight, row_mask, bias=None):
    """Reference: materialises the full logits [N, V]. float32 [N]."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None].long())[:, 0]
    return torch.where(row_mask, logp * row_weight.float(), torch.zeros_like(logp))


def masked_linear_ce(hidden, weight, targets, row_weight, row_mask, bias=None, impl="auto"):
    """See the module docstring. hidden [N, H], weight [V, H], targets [N], row_weight [N], row_mask bool [N]."""
    impl = resolve_impl(impl, hidden, "masked_linear_ce")
    return masked_linear_ce_eager(hidden, weight, targets, row_weight, row_mask, bias)
