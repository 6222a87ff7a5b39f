"""The readable reference of :func:`vrpo_kernels.masked_linear_ce` (``impl="eager"``)."""

from __future__ import annotations

import torch


def masked_linear_ce_eager(hidden, weight, targets, row_weight, row_mask, bias=None):
    """Reference: materialises the full logits [N, V] in fp32. float32 [N]; ``row_mask`` bool [N]."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None].long())[:, 0]
    return torch.where(row_mask, logp * row_weight.float(), torch.zeros_like(logp))
