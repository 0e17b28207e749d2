"""DAPO-style GRPO loss with PREPO's per-rollout weights.

    A_i        = (r_i - mean_g r) / (std_g r + eps)          over the G rollouts of a prompt
    ratio_it   = exp(logp_it - logp_old_it)
    surr_it    = min(ratio_it A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) A_i)
    loss       = - sum_it w_i surr_it m_it / sum_it m_it       (token-mean over the mini-batch)
               + beta * token-mean of k3 KL to a frozen reference (beta = 0 by default)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps); rewards are [N] with groups as consecutive rows.
    std is the unbiased sample std (as in GRPO / TRL); an all-equal group gives 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size).float()
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


@dataclass
class LossOutput:
    loss: torch.Tensor
    clip_frac: float
    kl: float
    ratio_mean: float


def grpo_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    ref_logprob: Optional[torch.Tensor] = None,
    kl_beta: float = 0.0,
    num_tokens: Optional[float] = None,
) -> LossOutput:
    """Loss over a mini-batch: logprob / old_logprob / mask are [N, T], advantages and weights [N].
    ``num_tokens``: the token-mean's denominator when these rows are one micro-batch (or one
    rank's share) of a larger mini-batch: the mini-batch's total completion tokens, so that the
    parts' losses (and clip_frac, ratio_mean, kl) sum to the whole mini-batch's. Default: this
    mask's tokens."""
    maskf = mask.to(logprob.dtype)
    n_tok = maskf.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
    adv = advantages.detach().to(logprob.dtype)[:, None]
    ratio = torch.exp(logprob - old_logprob.detach())
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    surr = torch.minimum(surr1, surr2)
    if weights is not None:
        surr = surr * weights.detach().to(logprob.dtype)[:, None]
    loss = -(surr * maskf).sum() / n_tok
    kl_val = 0.0
    if kl_beta > 0 and ref_logprob is not None:
        d = ref_logprob.detach() - logprob
        kl = torch.exp(d) - d - 1
        kl_mean = (kl * maskf).sum() / n_tok
        loss = loss + kl_beta * kl_mean
        kl_val = kl_mean.item()
    with torch.no_grad():
        clipped = (surr2 < surr1) & mask.bool()   # the clipped branch is the active minimum
        clip_frac = (clipped.float().sum() / n_tok).item()
        ratio_mean = ((ratio * maskf).sum() / n_tok).item()
    return LossOutput(loss=loss, clip_frac=clip_frac, kl=kl_val, ratio_mean=ratio_mean)
