"""PREPO's relative-entropy rollout weights.

    H_i   = mean over rollout i's tokens of the full-vocabulary entropy
    H_bar = sum of all token entropies / number of tokens        (token-weighted batch mean)
    w_i   = H_i / H_bar                                         (detached)

So sum_i |o_i| w_i / sum_i |o_i| = 1 (the effective batch is preserved), w is invariant to a
common scale of the entropies, and equal entropies give w = 1 (plain GRPO).
"""
from __future__ import annotations

from typing import Callable

import torch

import prepo_kernels


def relative_entropy_weights(token_entropy: torch.Tensor, mask: torch.Tensor,
                             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """w [N] from per-token entropies [N, T] and the completion mask [N, T]. A batch whose
    token-weighted mean entropy is 0 (or that has no tokens) gets w = 1. ``reduce`` sums the
    batch totals (entropy sum, token count) over data-parallel ranks, so H_bar is the global
    batch's."""
    token_entropy = token_entropy.detach().float()
    maskf = mask.to(token_entropy.dtype)
    h_i = prepo_kernels.sequence_mean(token_entropy, mask.bool())
    totals = reduce(torch.stack([(token_entropy * maskf).sum(), maskf.sum()]))
    n_tok = totals[1]
    h_bar = totals[0] / n_tok.clamp(min=1)
    if n_tok == 0 or h_bar <= 0:
        return torch.ones_like(h_i)
    return h_i / h_bar
