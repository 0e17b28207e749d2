"""Fused linear GRPO loss: the DAPO clipped surrogate straight from hidden states and the LM head,
with its gradients computed in the forward pass (three matmuls of [N, D] x [D, V] instead of four).

    loss, stats = linear_grpo_loss(hidden, lm_head.weight, targets, old_logprob, advantages * w[:, None])
    loss.backward()

Why three: the surrogate's gradient w.r.t. a token's log-prob depends only on that token's
log-prob, old log-prob, advantage and the clip range, so once a row chunk's full-vocabulary logits
are in memory (matmul 1) its dL/dz follows in one pass, and dh (matmul 2) and dW (matmul 3) are
accumulated right away (Liger's fused linear losses work this way). linear_logprob_entropy cannot
know the loss at forward time and recomputes the logits in backward (four matmuls).

Backends (``impl``): "reference" (materialized logits and torch autograd: the oracle), "torch"
(row chunks in plain PyTorch, any device), "cpu" (the C++/OpenMP op
``prepo_kernels::grpo_loss_fwdbwd`` of csrc/cpu/grpo_loss_cpu.cpp), "triton" (the torch row-chunk
loop with its per-row softmax / surrogate / dL/dz pass as one Triton kernel: CUDA, or CPU under
TRITON_INTERPRET=1; tested under the interpreter and compiled for sm_90, not yet run on a GPU).
The backend contract is :mod:`prepo_kernels.grpo_backends`' docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import validation
from .autograd import _scatter_rows
from .backends import registry
from .backends.base import accumulation_dtype
from .grpo_backends import BACKENDS, clipped_surrogate, grpo_unavailable_reason
from .reference import reference_linear_logprob_entropy


@dataclass(frozen=True)
class GRPOLossStats:
    """Detached per-token values for logging, each with ``targets``' shape.

    logprob: fp32 (fp64 for fp64 inputs) log-prob of the target at the current policy, in nats;
        0 where not ``computed``.
    entropy: the full-vocabulary entropy, same dtype, 0 where not ``computed``; None unless
        ``compute_entropy=True``.
    computed: bool, the tokens that were computed: a valid target and a non-zero advantage (the
        others cost nothing and contribute exactly 0 to the loss and the gradients).
    clip_frac: 0-d, the clipped tokens over the token-mean's denominator, as in
        ``prepo.loss.grpo_loss`` (a zero-advantage token is never clipped, so this is exact).
    """

    logprob: Tensor
    entropy: Optional[Tensor]
    computed: Tensor
    clip_frac: Tensor


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprob: Optional[Tensor],
    advantages: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: validation.Temperature = 1.0,
    ignore_index: int = -100,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    num_tokens: Optional[Union[int, float]] = None,
    compute_entropy: bool = False,
    impl: str = "auto",
) -> tuple[Tensor, GRPOLossStats]:
    """The DAPO-style GRPO loss of ``prepo.loss.grpo_loss`` (no KL term), from hidden states.

        z = (hidden @ weight.T + bias) / temperature,  logprob = log_softmax(z)[target]
        ratio = exp(logprob - old_logprob)
        loss = -sum_valid min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) / num_tokens

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 (float64 for checks).
        weight: [V, D], same dtype (the LM head); bias: optional [V].
        targets: [...] int64 token ids in [0, V), or ``ignore_index`` (not counted, no gradient).
        old_logprob: float tensor with ``targets``' shape (the behaviour policy's log-probs; constant),
            or None: on-policy, the old log-probs are the new ones, detached (the ratio is exactly 1,
            as TRL's GRPO takes it when it makes no old-log-prob pass).
        advantages: float tensor broadcastable to ``targets``' shape, e.g. [B, 1] per rollout or
            [B, T] per token, with PREPO's w_i already multiplied in (constant). Tokens whose
            advantage is exactly 0 cost nothing (no matmul) and contribute exactly 0.
        temperature: a float > 0 or a tensor broadcastable to ``targets`` (constant).
        eps_low, eps_high: the clip range, 0 <= eps_low < 1, eps_high >= 0.
        num_tokens: the token-mean's denominator (> 0) when these rows are one micro-batch of a
            larger mini-batch; default: this call's valid targets (at least 1).
        compute_entropy: also return each computed token's full-vocabulary entropy in ``stats``.
        impl: "auto" (the registry's choice where this loss has it: "cpu" on CPU tensors when the
            extension is built, "triton" on CUDA tensors; else "torch"), "reference", "torch",
            "cpu" or "triton".

    Returns:
        (loss, stats): loss is a 0-d fp32 tensor (fp64 for fp64 inputs), differentiable w.r.t.
        hidden, weight and bias; its gradients are computed in this call (so backward only scales
        them) and only when one of those requires grad. ``stats`` is a :class:`GRPOLossStats`.

    Raises ValueError / TypeError naming the bad argument, and BackendUnavailableError for an
    ``impl`` that cannot run here.
    """
    validation.check_linear_inputs(hidden, weight, targets, bias, ignore_index)
    old, adv = _check_grpo_inputs(targets, old_logprob, advantages, eps_low, eps_high, num_tokens, compute_entropy)
    backend = _resolve(impl, hidden.device)
    acc = accumulation_dtype(hidden.dtype)
    y = validation.checked_targets(targets.reshape(-1), weight.shape[0], ignore_index)
    inv_temp = validation.temperature_per_row(temperature, targets, acc)
    old = None if old is None else old.reshape(-1).to(acc)
    adv = torch.broadcast_to(adv, targets.shape).reshape(-1).to(acc)
    valid = y != ignore_index
    computed = valid & (adv != 0)
    scale = _token_mean_scale(valid, num_tokens, acc)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if backend == "reference":
        loss, logprob, entropy = _reference(h2, weight, bias, y, inv_temp, old, adv, valid, scale,
                                            ignore_index, eps_low, eps_high)
        logprob, entropy = (torch.where(computed, t.detach(), 0) for t in (logprob, entropy))
    else:
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        loss, logprob, entropy, *_ = fused_grpo_loss(
            h2, weight, bias, y, inv_temp, old, adv, scale, ignore_index, eps_low, eps_high,
            compute_entropy, need_grad, backend)
    _, clipped = clipped_surrogate(logprob, old, adv, eps_low, eps_high)
    stats = GRPOLossStats(
        logprob=logprob.view(targets.shape),
        entropy=entropy.view(targets.shape) if compute_entropy else None,
        computed=computed.view(targets.shape),
        clip_frac=((clipped & computed).sum() * scale).detach(),
    )
    return loss, stats


def _token_mean_scale(valid: Tensor, num_tokens: Optional[Union[int, float]], dtype: torch.dtype) -> Tensor:
    """0-d 1 / (the token-mean's denominator): ``num_tokens`` when given, else the valid targets (>= 1)."""
    if num_tokens is None:
        return 1.0 / valid.sum().clamp(min=1).to(dtype)
    return torch.tensor(1.0 / max(float(num_tokens), 1.0), dtype=dtype, device=valid.device)


def _check_grpo_inputs(targets, old_logprob, advantages, eps_low, eps_high, num_tokens, compute_entropy):
    validation.check_tensor("advantages", advantages, floating=True)
    validation.check_same_device(targets=targets, advantages=advantages)
    if old_logprob is not None:
        validation.check_tensor("old_logprob", old_logprob, floating=True)
        validation.check_same_device(targets=targets, old_logprob=old_logprob)
        if old_logprob.shape != targets.shape:
            raise ValueError(f"old_logprob shape {tuple(old_logprob.shape)} must equal targets' shape "
                             f"{tuple(targets.shape)}")
    if not validation._broadcasts(tuple(advantages.shape), tuple(targets.shape)):
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} does not broadcast to targets' shape "
                         f"{tuple(targets.shape)} (per-rollout advantages of [B, T] targets: pass [B, 1])")
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(eps).__name__}")
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not (eps_high >= 0 and math.isfinite(eps_high)):
        raise ValueError(f"eps_high must be finite and >= 0, got {eps_high}")
    if num_tokens is not None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float)):
            raise TypeError(f"num_tokens must be a number or None, got {type(num_tokens).__name__}")
        if not (num_tokens > 0 and math.isfinite(num_tokens)):
            raise ValueError(f"num_tokens must be finite and > 0, got {num_tokens}")
    if not isinstance(compute_entropy, bool):
        raise TypeError(f"compute_entropy must be a bool, got {type(compute_entropy).__name__}")
    return None if old_logprob is None else old_logprob.detach(), advantages.detach()


def grpo_runs_natively(impl: str, device: Union[str, torch.device]) -> bool:
    """Whether ``linear_grpo_loss(..., impl=impl)`` runs on ``device`` the backend that
    ``linear_logprob_entropy(..., impl=impl)`` runs there ("auto": the registry's choice), not the
    torch fallback "auto" takes where this loss lacks that backend ("cuda", whose fused log-prob
    kernels beat this loss's row chunks in plain PyTorch). On GPUs "auto" is "triton", which it has."""
    try:
        name = registry.resolve(impl, torch.device(device))
    except registry.BackendUnavailableError:
        return False
    return name == "reference" or grpo_unavailable_reason(name, torch.device(device)) is None


def _resolve(impl: str, device: torch.device) -> str:
    """The GRPO backend for ``impl``: "auto" takes the registry's choice (which honours
    PREPO_KERNELS_IMPL) when this loss has that backend, else the torch backend."""
    name = registry.resolve(impl, device)
    why = None if name == "reference" else grpo_unavailable_reason(name, device)
    if why is None:
        return name
    if impl == "auto":
        return "torch"
    raise registry.BackendUnavailableError(f"linear_grpo_loss impl={impl!r}: {why}")


def _reference(h, weight, bias, y, inv_temp, old, adv, valid, scale, ignore_index, eps_low, eps_high):
    """The oracle: materialized logits, the surrogate, torch autograd."""
    logprob, entropy = reference_linear_logprob_entropy(h, weight, y, bias, inv_temp, ignore_index)
    surr, _ = clipped_surrogate(logprob, old, adv, eps_low, eps_high)
    loss = -(surr * valid).sum() * scale
    return loss, logprob, entropy


# ------------------------------------------------------------------------------------------------
# the fused path: one custom op (opaque to torch.compile) whose backward only scales its gradients


@torch.library.custom_op("prepo_kernels::fused_grpo_loss", mutates_args=())
def fused_grpo_loss(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temp: Tensor,
    old_logprob: Optional[Tensor], advantages: Tensor, scale: Tensor, ignore_index: int, eps_low: float,
    eps_high: float,
    compute_entropy: bool, need_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N] (checked), inv_temp / old_logprob /
    advantages [N] (old_logprob None: on-policy) and scale 0-d in the accumulation dtype -> (loss 0-d, logprob [N], entropy [N] or
    [0], grad_hidden [N, D] or [0], grad_weight [V, D] or [0], grad_bias [V] or [0]): the gradients
    of the loss in the parameters' dtypes, when ``need_grad``. Only rows with a valid target and a
    non-zero advantage reach the backend; the others give 0 everywhere."""
    n, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    computed = (targets != ignore_index) & (advantages != 0)
    rows = computed.nonzero().squeeze(1)
    if rows.numel() == 0:
        zeros = hidden.new_zeros((n,), dtype=acc)
        entropy = zeros.clone() if compute_entropy else zeros.new_zeros(0)
        return (zeros.new_zeros(()), zeros, entropy) + _zero_grads(hidden, weight, bias, need_grad)
    pick = (lambda x: x) if rows.numel() == n else (lambda x: x.index_select(0, rows))  # noqa: E731
    lp, ent, dh, dw, db = BACKENDS[backend](
        pick(hidden).contiguous(), weight.contiguous(), bias, pick(targets), pick(inv_temp),
        None if old_logprob is None else pick(old_logprob), pick(advantages), float(scale), eps_low, eps_high, compute_entropy, need_grad)
    logprob = _scatter_rows(lp, rows, n)
    entropy = _scatter_rows(ent, rows, n) if compute_entropy else ent
    if need_grad:  # dW is the backend's own tensor (the weight's dtype): no second [V, D] buffer
        grads = (_scatter_rows(dh.to(hidden.dtype), rows, n), dw,
                 db.to(bias.dtype) if bias is not None else weight.new_zeros(0))
    else:
        grads = _zero_grads(hidden, weight, bias, need_grad)
    surr, _ = clipped_surrogate(logprob, old_logprob, advantages, eps_low, eps_high)
    loss = -torch.where(computed, surr, 0).sum() * scale
    return (loss, logprob, entropy) + grads


def _zero_grads(hidden, weight, bias, need_grad):
    if not need_grad:
        return tuple(hidden.new_zeros(0) for _ in range(3))
    grad_b = torch.zeros_like(bias) if bias is not None else weight.new_zeros(0)
    return torch.zeros_like(hidden), torch.zeros_like(weight), grad_b


@fused_grpo_loss.register_fake
def _fused_grpo_loss_fake(hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, ignore_index,
                          eps_low, eps_high, compute_entropy, need_grad, backend):
    n, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    if need_grad:
        grads = (torch.empty_like(hidden), torch.empty_like(weight),
                 torch.empty_like(bias) if bias is not None else weight.new_empty(0))
    else:
        grads = tuple(hidden.new_empty(0) for _ in range(3))
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((n,), dtype=acc),
            hidden.new_empty((n if compute_entropy else 0,), dtype=acc)) + grads


def _setup_context(ctx, inputs, output):
    # a plain attribute, not save_for_backward, so that _backward can drop the graph's reference and
    # autograd then moves the gradients into .grad instead of copying them (a second [V, D] buffer);
    # no reference cycle: these outputs are non-differentiable
    ctx.grads = output[3:]
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else backward first gets zeros the size of every output, dW's too


def _backward(ctx, grad_loss, *_):
    (grad_h, grad_w, grad_b), ctx.grads = ctx.grads, None  # set when the loss requires grad (need_grad)
    if not bool(grad_loss == 1):  # loss.backward() passes exactly 1: hand the gradients over as they are
        grad_h, grad_w, grad_b = (g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b))
    return (grad_h, grad_w, grad_b if ctx.has_bias else None) + (None,) * 11


fused_grpo_loss.register_autograd(_backward, setup_context=_setup_context)
