"""The GRPO policy objective of TRL 1.16's ``GRPOTrainer._compute_loss``, on per-token log-probs
and entropies: the one definition every path of :func:`prepo_kernels.linear_grpo_loss` evaluates
(the reference, the one-pass fused backends' per-token gradients, the two-pass path) and
``prepo.loss.grpo_loss`` reuses.

With lp [B, T] the current log-probs, H [B, T] the entropies, m [B, T] the completion mask:

    log_ratio = lp - old                                  (old = lp.detach() when not given: ratio 1)
    coef_1    = exp(log_ratio)                            importance_sampling_level "token"
              = exp(sum_t m log_ratio / max(sum_t m, 1))  "sequence" (one value per row, [B, 1])
    per-token policy loss by loss_type:
        grpo / bnpo / dr_grpo / dapo / luspo:  -min(min(coef_1, delta) A, clip(coef_1, 1 - eps_low, 1 + eps_high) A)
        cispo:  -min(coef_1, eps_high).detach() A lp
        sapo:   -sigmoid(tau (coef_1 - 1)) 4 / tau A,   tau = sapo_temperature_pos if A > 0 else _neg
        vespo:  -phi A lp, phi the detached gamma weight of the sequence's ratio (TRL's get_gamma_weights)
    times the off-policy sequence mask (off_policy_mask_threshold), the top-entropy mask
    (top_entropy_quantile) and vLLM's importance-sampling ratio (not for vespo, which takes it in phi),
    plus beta k3(ref, lp) (times coef_1 with use_bias_correction_kl);
    aggregated as TRL does per loss_type (``aggregate``), minus entropy_coef times the token-mean
    entropy over the effective mask, divided by accumulation_steps.

A token's gradient depends only on its own values ("one pass": the fused backends compute it in the
forward) unless importance_sampling_level is "sequence", loss_type is "vespo", top_entropy_quantile
< 1 or off_policy_mask_threshold is set: :attr:`GRPOLossParams.one_pass`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class GRPOLossParams:
    """The loss's options, with TRL's ``GRPOConfig`` names and meanings (defaults: DAPO, no KL).

    eps_low / eps_high: the clip range (TRL's epsilon / epsilon_high; cispo's cap is eps_high).
    delta: TRL's two-sided clip, an upper bound on the unclipped ratio (> 0), or None.
    beta: the k3 KL coefficient (needs ref_logprob); use_bias_correction_kl multiplies the KL by coef_1.
    entropy_coef: the entropy bonus (loss - entropy_coef * token-mean entropy); TRL's adaptive
        controller passes the coefficient it applies to each call.
    top_entropy_quantile: keep only tokens at or above this entropy quantile (1.0: all).
    off_policy_mask_threshold: drop negative-advantage rows whose mean KL(sampling || current)
        exceeds it (None: off).
    max_completion_length: dr_grpo's denominator (B * max_completion_length); required for dr_grpo.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.28
    delta: Optional[float] = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    max_completion_length: Optional[int] = None

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {LEVELS}, got {self.importance_sampling_level!r}")
        floats = {k: getattr(self, k) for k in ("eps_low", "eps_high", "beta", "entropy_coef", "top_entropy_quantile",
                                                 "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                                                 "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")}
        for opt in ("delta", "off_policy_mask_threshold"):
            if getattr(self, opt) is not None:
                floats[opt] = getattr(self, opt)
        for name, v in floats.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"the clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                             f"{self.eps_high}")
        if self.delta is not None and self.delta <= 0:
            raise ValueError(f"delta must be > 0 (TRL recommends > 1 + eps_high), got {self.delta}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if min(self.sapo_temperature_pos, self.sapo_temperature_neg) <= 0:
            raise ValueError("sapo temperatures must be > 0")
        if self.loss_type == "dr_grpo" and (isinstance(self.max_completion_length, bool) or not isinstance(
                self.max_completion_length, int) or self.max_completion_length < 1):
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length, an int >= 1, got "
                             f"{self.max_completion_length!r}")

    @property
    def one_pass(self) -> bool:
        """Whether each token's gradient depends only on its own log-prob and entropy."""
        return (self.importance_sampling_level == "token" and self.loss_type != "vespo"
                and self.top_entropy_quantile == 1.0 and self.off_policy_mask_threshold is None)


@dataclass(frozen=True)
class GRPOTokens:
    """The loss's per-token constants, each [B, T] (advantages [B, 1] or [B, T]), detached.

    old_logprob: the behaviour policy's log-probs, or None (on-policy: the ratio is exactly 1).
    ref_logprob: the reference model's (needed when beta != 0).
    importance_sampling_ratio: vLLM's correction ([B, T] token modes, [B, 1] sequence modes), or None.
    sampling_logprob: the sampler's log-probs for the off-policy mask (default: old_logprob).
    """

    advantages: Tensor
    old_logprob: Optional[Tensor] = None
    ref_logprob: Optional[Tensor] = None
    importance_sampling_ratio: Optional[Tensor] = None
    sampling_logprob: Optional[Tensor] = None


@dataclass(frozen=True)
class GRPOTerms:
    """The objective's value and the detached terms TRL logs: loss (0-d, differentiable), policy_loss
    (the loss before the entropy bonus), coef_1 ([B, T] or [B, 1]), per_token_kl (None without beta),
    phi (vespo's [B, 1] weights, else None), effective_mask ([B, T], the tokens the entropy bonus
    averages over)."""

    loss: Tensor
    policy_loss: Tensor
    coef_1: Tensor
    per_token_kl: Optional[Tensor]
    phi: Optional[Tensor]
    effective_mask: Tensor


def token_loss(lp: Tensor, coef_1: Tensor, c: GRPOTokens, p: GRPOLossParams, multiplier: Optional[Tensor] = None,
               phi: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(per-token loss, per-token KL or None) elementwise, as TRL: the surrogate of ``p.loss_type``,
    times ``multiplier`` (the off-policy and entropy masks) and vLLM's ratio, plus beta k3."""
    adv = c.advantages
    if p.loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=p.eps_high).detach() * adv * lp
    elif p.loss_type in CLIP_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - p.eps_low, 1 + p.eps_high)
        coef_1d = coef_1 if p.delta is None else torch.clamp(coef_1, max=p.delta)
        loss = -torch.min(coef_1d * adv, coef_2 * adv)
    elif p.loss_type == "sapo":
        tau = torch.where(adv > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
        loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    else:  # vespo
        loss = -phi * adv * lp
    if multiplier is not None:
        loss = loss * multiplier
    if c.importance_sampling_ratio is not None and p.loss_type != "vespo":
        loss = loss * c.importance_sampling_ratio
    kl = None
    if p.beta != 0.0:
        d = c.ref_logprob - lp
        kl = torch.exp(d) - d - 1
        if p.use_bias_correction_kl:
            kl = kl * coef_1
        loss = loss + p.beta * kl
    return loss, kl


def aggregate(per_token: Tensor, mask: Tensor, p: GRPOLossParams, num_tokens: Optional[float],
              accumulation_steps: float) -> Tensor:
    """TRL's reduction of the [B, T] (or [B, 1]) per-token loss over the [B, T] float mask."""
    if p.loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if p.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if p.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * p.max_completion_length) / accumulation_steps
    if p.loss_type == "luspo":
        return (per_token * mask).sum(-1).mean() / accumulation_steps
    denominator = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens  # dapo, cispo, vespo
    return (per_token * mask).sum() / denominator


def entropy_bonus(entropy: Tensor, effective_mask: Tensor, accumulation_steps: float) -> Tensor:
    """TRL's entropy term: the token-mean entropy over the effective mask, over accumulation_steps."""
    return (entropy * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_steps


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float,
                      gather: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
    """TRL's get_high_entropy_mask: the tokens whose entropy is at or above the ``1 - quantile``
    quantile of every masked token's (of all ranks when ``gather`` concatenates the ranks' values)."""
    values = entropy[mask.bool()].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - quantile)
    return ((entropy * mask.float()) >= threshold) & mask.bool()


def off_policy_mask(advantages: Tensor, lp: Tensor, sampling: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """TRL's get_off_policy_mask: [B, 1], 0 where the advantage is negative and the sequence's mean
    KL(sampling || current) exceeds the threshold (NaN sampling log-probs count as no evidence)."""
    kl = torch.nan_to_num(sampling - lp.detach(), nan=0.0)
    avg = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(mask.dtype)


@torch.no_grad()
def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, is_ratio: Optional[Tensor],
                  p: GRPOLossParams) -> Tensor:
    """TRL's get_gamma_weights (vespo): phi(w) = exp(lambda + k log w - lambda w) of the sequence's
    clamped summed log-ratio w (plus log vLLM ratio), k and lambda by the advantage's sign; [B, 1]."""
    lower = math.log(1e-8)
    seq = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if is_ratio is not None:
        seq += torch.sum(torch.clamp(torch.log(is_ratio), lower, 20.0), dim=-1, keepdim=True)
    log_w = torch.clamp(seq, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, p.vespo_k_pos, p.vespo_k_neg)
    lam = torch.where(nonneg, p.vespo_lambda_pos, p.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_objective(lp: Tensor, entropy: Optional[Tensor], mask: Tensor, c: GRPOTokens, p: GRPOLossParams, *,
                   num_tokens: Optional[float] = None, accumulation_steps: float = 1.0,
                   gather_entropies: Optional[Callable[[Tensor], Tensor]] = None) -> GRPOTerms:
    """The loss of the module docstring from lp [B, T] and entropy [B, T] (None only without the
    entropy bonus and the entropy mask); differentiable in both. mask [B, T] bool or 0/1;
    num_tokens: dapo / cispo / vespo's denominator (default: the mask's tokens)."""
    maskf = mask.to(lp.dtype)
    old = lp.detach() if c.old_logprob is None else c.old_logprob
    multiplier = None
    if p.off_policy_mask_threshold is not None:
        sampling = old if c.sampling_logprob is None else c.sampling_logprob
        multiplier = off_policy_mask(c.advantages, lp, sampling, maskf, p.off_policy_mask_threshold)
    entropy_mask = None
    if p.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy.detach(), mask, p.top_entropy_quantile, gather_entropies)
        multiplier = entropy_mask if multiplier is None else multiplier * entropy_mask
    log_ratio = lp - old
    if p.importance_sampling_level == "token":
        coef_1 = torch.exp(log_ratio)
    else:
        coef_1 = torch.exp(((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1))
    phi = None
    if p.loss_type == "vespo":
        phi = gamma_weights(c.advantages, log_ratio, maskf, c.importance_sampling_ratio, p)
    per_token, kl = token_loss(lp, coef_1, c, p, multiplier, phi)
    loss = aggregate(per_token, maskf, p, num_tokens, accumulation_steps)
    policy_loss = loss.detach()
    effective = maskf if entropy_mask is None else maskf * entropy_mask
    if p.entropy_coef != 0.0:
        loss = loss - p.entropy_coef * entropy_bonus(entropy, effective, accumulation_steps)
    return GRPOTerms(loss=loss, policy_loss=policy_loss, coef_1=coef_1.detach(),
                     per_token_kl=None if kl is None else kl.detach(), phi=phi, effective_mask=effective)
