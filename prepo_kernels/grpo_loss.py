"""Fused linear GRPO loss: every policy loss TRL 1.16's GRPOTrainer computes (loss types grpo,
bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo; token or sequence importance sampling; delta; k3 KL;
entropy bonus; top-entropy mask; vLLM importance sampling; off-policy mask), straight from hidden
states and the LM head, without the [N, V] logits.

    loss, stats = linear_grpo_loss(hidden, lm_head.weight, targets, old_logprob, advantages,
                                   rollout_weights=w, params=GRPOLossParams(loss_type="grpo", beta=0.04),
                                   ref_logprob=ref)
    loss.backward()

The objective is written once, in :mod:`prepo_kernels.grpo_objective`; this module runs it on the
fused log-probs and entropies along one of two paths:

* one pass (three matmuls of [N, D] x [D, V]), where a token's gradient depends only on its own
  log-prob and entropy (:attr:`GRPOLossParams.one_pass`: token-level ratios, no vespo, no entropy
  quantile, no off-policy mask): each row chunk's logits (matmul 1) give its log-probs and
  entropies, the objective's per-token gradient follows (torch autograd on [rows] vectors), dL/dz
  overwrites the logits, and dh (matmul 2) and dW (matmul 3) are accumulated in the forward, as
  Liger's fused linear losses do; backward only scales them. Tokens whose gradient is exactly 0
  (masked, zero advantage without KL or entropy bonus, zero aggregation weight) cost nothing.
* two passes (four matmuls), where it depends on other tokens (sequence-level ratios, vespo's
  sequence weights, the entropy quantile, the off-policy sequence mask), and with
  ``process_group``: :func:`prepo_kernels.linear_logprob_entropy` gives every token's log-prob and
  entropy, the objective follows on those [B, T] values, and autograd takes dL/dlogprob and
  dL/dentropy back through the fused op's backward (which recomputes the logits).

Backends: the registry's (``impl`` as for linear_logprob_entropy: "auto" resolves identically and
an ``impl`` that cannot run raises ``BackendUnavailableError`` for both). "reference" materializes
the logits (the oracle); "torch", "cpu" and "triton" have the one-pass row pass
(``Backend.grpo_chunks``); "cuda" runs every variant in two passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from torch import Tensor

from . import validation
from .backends import registry
from .backends.base import accumulation_dtype
from .backends.grpo_chunks import one_pass_fwdbwd
from .functional import linear_logprob_entropy
from .grpo_objective import GRPOLossParams, GRPOTerms, GRPOTokens, aggregate, entropy_bonus, grpo_objective, token_loss

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

DEFAULT_PARAMS = GRPOLossParams()


@dataclass(frozen=True)
class GRPOLossStats:
    """Detached per-token values, each with ``targets``' shape unless said otherwise.

    logprob: fp32 (fp64 for fp64 inputs) log-prob of the target, in nats; 0 where not ``computed``.
    entropy: the full-vocabulary entropy, same dtype, 0 where not ``computed``; None unless
        ``compute_entropy=True`` or the loss needs it.
    computed: bool, the tokens whose log-prob was computed: every valid target on the two-pass path,
        the tokens with a non-zero gradient on the one-pass path (the others contribute exactly 0).
    clip_frac: 0-d, the region-clipped tokens (ratio below 1 - eps_low with A < 0, above 1 + eps_high
        with A > 0) over ``num_tokens`` (default: the valid targets).
    terms: the objective's :class:`~prepo_kernels.grpo_objective.GRPOTerms` on [B, T] (the targets'
        leading dims flattened): coef_1, per_token_kl, phi, policy_loss, effective_mask (TRL's metrics).
    """

    logprob: Tensor
    entropy: Optional[Tensor]
    computed: Tensor
    clip_frac: Tensor
    terms: GRPOTerms


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprob: Optional[Tensor],
    advantages: Tensor,
    *,
    ref_logprob: Optional[Tensor] = None,
    importance_sampling_ratio: Optional[Tensor] = None,
    sampling_logprob: Optional[Tensor] = None,
    rollout_weights: Optional[Tensor] = None,
    params: Optional[GRPOLossParams] = None,
    bias: Optional[Tensor] = None,
    temperature: validation.Temperature = 1.0,
    ignore_index: int = -100,
    num_tokens: Optional[Union[int, float]] = None,
    accumulation_steps: float = 1.0,
    gather_entropies: Optional[Callable[[Tensor], Tensor]] = None,
    compute_entropy: bool = False,
    impl: str = "auto",
    process_group: Optional[ProcessGroup] = None,
) -> tuple[Tensor, GRPOLossStats]:
    """TRL's GRPO policy loss (:mod:`prepo_kernels.grpo_objective`) of z = (hidden @ weight.T + bias) / temperature.

    Args:
        hidden: [..., T, D] float32 / bfloat16 / float16 (float64 for checks); the leading dims are
            the sequences (B = their product; [T, D] is one sequence).
        weight: [V, D], same dtype (the LM head); bias: optional [V]; temperature: a float > 0 or a
            tensor broadcastable to ``targets`` (constant).
        targets: [..., T] int64 token ids in [0, V), or ``ignore_index`` (the completion mask).
        old_logprob: float [..., T], the behaviour policy's log-probs, or None (on-policy: the ratio is
            exactly 1, as TRL takes it when it makes no old-log-prob pass).
        advantages: float, [..., 1] per sequence or [..., T] per token (broadcastable to targets).
        ref_logprob: [..., T], the reference model's log-probs (required when params.beta != 0).
        importance_sampling_ratio: vLLM's correction, [..., T] or [..., 1], or None.
        sampling_logprob: [..., T] the sampler's log-probs for the off-policy mask (default old_logprob).
        rollout_weights: [...] per sequence (PREPO's w_i), multiplied into the advantages; a sequence
            with weight 0 (and no KL or entropy bonus) costs nothing.
        params: :class:`GRPOLossParams` (default: DAPO, eps 0.2 / 0.28, no KL).
        num_tokens: dapo / cispo / vespo's denominator (TRL's normalizer) when these rows are one
            micro-batch of a larger batch; default: this call's valid targets.
        accumulation_steps: what grpo / bnpo / dr_grpo / sapo / luspo losses and the entropy bonus are
            divided by (TRL's current_gradient_accumulation_steps in training, 1 in eval).
        gather_entropies: for top_entropy_quantile < 1 across ranks, a function concatenating the
            ranks' 1-D entropies (TRL pads and gathers); default: this call's tokens only.
        compute_entropy: also return the entropies in ``stats``; impl: the registry's names.
        process_group: a vocab-parallel LM head (``weight`` is this rank's shard), as for
            :func:`prepo_kernels.linear_logprob_entropy`; always the two-pass path.

    Returns (loss, stats): loss 0-d fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight
    and bias; :class:`GRPOLossStats`. Raises ValueError / TypeError naming the bad argument, and
    BackendUnavailableError for an ``impl`` that cannot run here.
    """
    params = DEFAULT_PARAMS if params is None else params
    _check_scalars(params, num_tokens, accumulation_steps, compute_entropy)
    validation.check_linear_inputs(hidden, weight, targets, bias, ignore_index)
    acc = accumulation_dtype(hidden.dtype)
    tokens = _checked_tokens(targets, acc, old_logprob, advantages, ref_logprob, importance_sampling_ratio,
                             sampling_logprob, rollout_weights, params)
    mask = (targets != ignore_index).reshape(-1, targets.shape[-1])
    name = registry.resolve(impl, hidden.device)
    chunks = None
    if params.one_pass and process_group is None and name != "reference":
        chunks = registry.get(name).grpo_chunks
    kwargs = dict(num_tokens=num_tokens, accumulation_steps=accumulation_steps, gather_entropies=gather_entropies)
    need_entropy = compute_entropy or params.entropy_coef != 0 or params.top_entropy_quantile < 1
    if chunks is None:
        lle = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, compute_entropy=need_entropy,
                   impl=name, process_group=process_group)
        loss, lp, ent, computed, terms = _two_pass(hidden, weight, targets, lle, mask, tokens, params, kwargs)
    else:
        loss, lp, ent, computed, terms = _one_pass(chunks, hidden, weight, bias, targets, temperature, ignore_index,
                                                   mask, tokens, params, need_entropy, kwargs)
    denominator = mask.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
    clipped = (_region_clipped(terms.coef_1, tokens, params) & mask).sum().to(acc)
    shape = targets.shape
    return loss, GRPOLossStats(logprob=lp.view(shape), entropy=None if ent is None else ent.view(shape),
                               computed=computed.view(shape), clip_frac=clipped / denominator, terms=terms)


def _two_pass(hidden, weight, targets, lle: dict, mask, c: GRPOTokens, p: GRPOLossParams, kwargs):
    """The two-pass path: linear_logprob_entropy (``lle``: its options), then the objective on its
    differentiable outputs; (loss, logprob [B, T], entropy or None, computed, terms), detached stats."""
    lp, ent = linear_logprob_entropy(hidden, weight, targets, **lle)
    lp, ent = lp.reshape(mask.shape), None if ent is None else ent.reshape(mask.shape)
    terms = grpo_objective(_filled(lp, mask, c), ent, mask, c, p, **kwargs)
    return terms.loss, lp.detach(), None if ent is None else ent.detach(), mask, terms


def _one_pass(chunks, hidden, weight, bias, targets, temperature, ignore_index, mask, c: GRPOTokens,
              p: GRPOLossParams, need_entropy, kwargs):
    """The one-pass path: (loss with its gradients attached, logprob [B, T], entropy or None, computed, terms)."""
    acc = accumulation_dtype(hidden.dtype)
    y = validation.checked_targets(targets.reshape(-1), weight.shape[0], ignore_index)
    inv_temp = validation.temperature_per_row(temperature, targets, acc)
    w_tok, e_tok = _token_weights(mask, p, acc, kwargs["num_tokens"], kwargs["accumulation_steps"])
    adv = torch.broadcast_to(c.advantages, mask.shape)
    live = mask & (w_tok != 0) & ((adv != 0) | (p.beta != 0)) | (e_tok != 0)
    rows = live.reshape(-1).nonzero().squeeze(1)
    flat = _flat_tokens(c, mask.shape, rows)
    w_live, e_live = w_tok.reshape(-1)[rows], e_tok.reshape(-1)[rows]

    def token_grads(lp_c: Tensor, sl: slice) -> tuple[Tensor, Optional[Tensor]]:
        with torch.enable_grad():
            x = lp_c.detach().requires_grad_()
            part = GRPOTokens(*(None if t is None else t[sl] for t in flat))
            old = x.detach() if part.old_logprob is None else part.old_logprob
            per_token, _ = token_loss(x, torch.exp(x - old), part, p)
            (g,) = torch.autograd.grad((w_live[sl] * per_token).sum(), x)
        return g, (e_live[sl] if p.entropy_coef != 0 else None)

    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    h2, n = hidden.reshape(-1, hidden.shape[-1]), mask.numel()
    every_row = rows.numel() == n  # then no [N, D] copies of the hidden states or their gradient
    pick = (lambda t: t) if every_row else (lambda t: t.index_select(0, rows))  # noqa: E731
    lp_r, ent_r, grads = one_pass_fwdbwd(chunks, pick(h2), weight, bias, pick(y), pick(inv_temp), token_grads,
                                         need_grad, need_entropy)
    lp = _scatter(lp_r, rows, n, every_row).view(mask.shape)
    ent = _scatter(ent_r, rows, n, every_row).view(mask.shape) if need_entropy else None
    with torch.no_grad():
        terms = grpo_objective(_filled(lp, live, c), ent, mask, c, p, **kwargs)
    loss = terms.loss
    if need_grad:
        grad_h = _scatter(grads[0].to(hidden.dtype), rows, n, every_row).view(hidden.shape)
        loss = _GradsInForward.apply(loss, hidden, weight, bias, (grad_h, grads[1], grads[2]))
    return loss, lp, ent, live, terms


def _scatter(values: Tensor, rows: Tensor, n: int, every_row: bool) -> Tensor:
    """[len(rows), ...] values at ``rows`` of n rows, 0 elsewhere (the values themselves for every row)."""
    if every_row:
        return values
    return values.new_zeros((n,) + tuple(values.shape[1:])).index_copy_(0, rows, values)


def _token_weights(mask: Tensor, p: GRPOLossParams, acc: torch.dtype, num_tokens, accumulation_steps):
    """(w, e) [B, T]: d loss / d per-token loss (TRL's aggregation, linear in it) and d loss / d entropy
    (the entropy bonus), constants of the one-pass path taken from the objective's own functions."""
    maskf = mask.to(acc)
    with torch.enable_grad():
        ones = torch.ones(mask.shape, dtype=acc, device=mask.device, requires_grad=True)
        (w,) = torch.autograd.grad(aggregate(ones, maskf, p, num_tokens, accumulation_steps), ones)
        e = torch.zeros_like(w)
        if p.entropy_coef != 0:
            (e,) = torch.autograd.grad(-p.entropy_coef * entropy_bonus(ones, maskf, accumulation_steps), ones)
    return w, e


def _flat_tokens(c: GRPOTokens, shape, rows: Tensor) -> tuple:
    """The per-token constants at the flattened rows ``rows`` of [B, T] (per-sequence ones broadcast)."""
    return tuple(None if t is None else torch.broadcast_to(t, shape).reshape(-1).index_select(0, rows)
                 for t in (c.advantages, c.old_logprob, c.ref_logprob, c.importance_sampling_ratio,
                           c.sampling_logprob))


def _filled(lp: Tensor, keep: Tensor, c: GRPOTokens) -> Tensor:
    """lp where ``keep``, else the old log-prob (a ratio of 1; 0 on-policy): the objective multiplies
    the tokens outside the mask by 0, and an arbitrary log-prob there could overflow exp to inf."""
    fill = 0.0 if c.old_logprob is None else c.old_logprob
    return torch.where(keep, lp, fill)


def _region_clipped(coef_1: Tensor, c: GRPOTokens, p: GRPOLossParams) -> Tensor:
    low = (coef_1 < 1 - p.eps_low) & (c.advantages < 0)
    high = (coef_1 > 1 + p.eps_high) & (c.advantages > 0)
    return low | high


def _checked_tokens(targets, acc, old_logprob, advantages, ref_logprob, importance_sampling_ratio, sampling_logprob,
                    rollout_weights, p: GRPOLossParams) -> GRPOTokens:
    """The per-token constants, checked, detached, in the accumulation dtype, with the targets'
    leading dims flattened: [B, T] or [B, 1]."""
    if targets.dim() == 0:
        raise ValueError("targets must have at least one dim ([..., T])")
    shape, lead = tuple(targets.shape), tuple(targets.shape[:-1])
    B, T = math.prod(lead), targets.shape[-1]

    def per_token(name, t, required=False):
        if t is None:
            if required:
                raise ValueError(f"{name} is required here (params: {p})")
            return None
        validation.check_tensor(name, t, floating=True)
        validation.check_same_device(targets=targets, **{name: t})
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal targets' shape {shape}")
        return t.detach().to(acc).reshape(B, T)

    def per_row_or_token(name, t):
        if t is None:
            return None
        validation.check_tensor(name, t, floating=True)
        validation.check_same_device(targets=targets, **{name: t})
        if not validation._broadcasts(tuple(t.shape), shape):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to targets' shape {shape} "
                             f"(per-sequence values of [..., T] targets: pass [..., 1])")
        last = T if t.dim() and t.shape[-1] == T and T != 1 else 1
        return torch.broadcast_to(t.detach().to(acc), lead + (last,)).reshape(B, last)

    adv = per_row_or_token("advantages", advantages)
    if rollout_weights is not None:
        validation.check_tensor("rollout_weights", rollout_weights, floating=True)
        validation.check_same_device(targets=targets, rollout_weights=rollout_weights)
        if tuple(rollout_weights.shape) != lead:
            raise ValueError(f"rollout_weights shape {tuple(rollout_weights.shape)} must be targets' leading dims "
                             f"{lead} (one weight per sequence)")
        adv = adv * rollout_weights.detach().to(acc).reshape(B, 1)
    return GRPOTokens(
        advantages=adv, old_logprob=per_token("old_logprob", old_logprob),
        ref_logprob=per_token("ref_logprob", ref_logprob, required=p.beta != 0),
        importance_sampling_ratio=per_row_or_token("importance_sampling_ratio", importance_sampling_ratio),
        sampling_logprob=per_token("sampling_logprob", sampling_logprob))


def _check_scalars(params, num_tokens, accumulation_steps, compute_entropy) -> None:
    if not isinstance(params, GRPOLossParams):
        raise TypeError(f"params must be a GRPOLossParams, got {type(params).__name__}")
    for name, v, optional in (("num_tokens", num_tokens, True), ("accumulation_steps", accumulation_steps, False)):
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got {type(v).__name__}")
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be finite and > 0, got {v}")
    if not isinstance(compute_entropy, bool):
        raise TypeError(f"compute_entropy must be a bool, got {type(compute_entropy).__name__}")


class _GradsInForward(torch.autograd.Function):
    """Attaches gradients computed in the forward to a loss: backward only scales them (by exactly 1
    for loss.backward(), so they are handed over as they are: no second [V, D] buffer)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads, ctx.has_bias = grads, bias is not None
        ctx.set_materialize_grads(False)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grad_loss is not None and not bool(grad_loss == 1):
            grads = tuple(g * grad_loss.to(g.dtype) for g in grads)
        grad_h, grad_w, grad_b = grads
        return None, grad_h, grad_w, grad_b.to(grad_w.dtype) if ctx.has_bias else None, None
