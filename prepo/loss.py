"""DAPO-style GRPO loss with PREPO's per-rollout weights, on materialized log-probs (the objective
is prepo_kernels.grpo_objective's, the one every fused path runs).

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

from prepo_kernels.grpo_objective import GRPOLossParams, GRPOTokens, grpo_objective


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
    mask's tokens. The objective is prepo_kernels' (TRL's DAPO loss with its k3 KL term, no bias
    correction), on materialized log-probs."""
    dtype = logprob.dtype
    adv = advantages.detach().to(dtype)[:, None]
    if weights is not None:
        adv = adv * weights.detach().to(dtype)[:, None]
    use_kl = kl_beta > 0 and ref_logprob is not None
    params = GRPOLossParams(eps_low=eps_low, eps_high=eps_high, beta=kl_beta if use_kl else 0.0)
    tokens = GRPOTokens(advantages=adv, old_logprob=old_logprob.detach().to(dtype),
                        ref_logprob=ref_logprob.detach().to(dtype) if use_kl else None)
    n_tok = None if num_tokens is None else max(float(num_tokens), 1.0)
    terms = grpo_objective(logprob, None, mask, tokens, params, num_tokens=n_tok)
    with torch.no_grad():
        maskf = mask.to(dtype)
        denominator = maskf.sum().clamp(min=1) if n_tok is None else n_tok
        clipped = (((terms.coef_1 < 1 - eps_low) & (adv < 0)) | ((terms.coef_1 > 1 + eps_high) & (adv > 0))) & mask.bool()
        clip_frac = (clipped.to(dtype).sum() / denominator).item()
        ratio_mean = ((terms.coef_1 * maskf).sum() / denominator).item()
        kl_val = ((terms.per_token_kl * maskf).sum() / denominator).item() if use_kl else 0.0
    return LossOutput(loss=terms.loss, clip_frac=clip_frac, kl=kl_val, ratio_mean=ratio_mean)
