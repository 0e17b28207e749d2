"""The oracle: plain PyTorch that materializes the [N, V] logits. Every backend is tested against it.

It computes the logits matmul in the inputs' dtype (so a bf16 call shows bf16's own rounding, the
yardstick for the tolerance rule in the tests) and the softmax statistics in the accumulation dtype
(fp32, or fp64 for fp64 inputs). Gradients come from torch autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends.base import accumulation_dtype


def reference_logprob_entropy(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (already divided by temperature), targets [N], valid [N] bool ->
    (logprob [N], entropy [N]) in the accumulation dtype; invalid rows give exactly 0."""
    z = logits.to(accumulation_dtype(logits.dtype))
    logp = torch.log_softmax(z, dim=-1)
    safe_targets = torch.where(valid, targets, 0)
    logprob = logp.gather(-1, safe_targets[:, None]).squeeze(-1)
    # p * log p is 0 where p == 0 (a -inf logit); mask first so no 0 * -inf NaN reaches autograd
    finite = torch.isfinite(logp)
    plogp = torch.where(finite, logp.exp() * torch.where(finite, logp, 0), 0)
    entropy = -plogp.sum(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(valid, logprob, zero), torch.where(valid, entropy, zero)


def reference_linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    inv_temp: torch.Tensor,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], targets [N], bias [V] or None, inv_temp [N] -> (logprob, entropy) [N]."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(accumulation_dtype(hidden.dtype)) * inv_temp[:, None]
    return reference_logprob_entropy(logits, targets, targets != ignore_index)
