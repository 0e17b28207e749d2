"""The one autograd path of every fused backend: two custom ops, ``prepo_kernels::fused_lle`` and its
backward ``prepo_kernels::fused_lle_backward``.

They do the work that is the same for all backends and exact: drop rows whose target is
ignore_index before any matmul, and in backward drop rows whose upstream gradients are both zero
(in GRPO every token of a zero-advantage group) -- no recompute, no dh/dW contribution. Picking
those rows depends on the data (``nonzero``), so it lives inside the ops, where ``torch.compile``
does not look: a compiled caller sees two opaque ops with fake (shape-only) kernels and no graph
break, and the row skipping still happens when the compiled graph runs.

The backend and the :class:`KernelParams` fields travel as plain str/bool arguments, so the ops'
schemas are fixed and the compiler can put them in a graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import registry
from .backends.base import KernelParams, accumulation_dtype


def _scatter_rows(values: Tensor, rows: Tensor, n: int) -> Tensor:
    if values.shape[0] == n:
        return values
    out = values.new_zeros((n,) + values.shape[1:])
    return out.index_copy_(0, rows, values)


@torch.library.custom_op("prepo_kernels::fused_lle", mutates_args=())
def fused_lle(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temp: Tensor,
    ignore_index: int, backend: str, compute_entropy: bool, deterministic: bool, grad_filter: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N] int64 (checked: in [0, V) or
    ignore_index), inv_temp [N] -> (logprob [N], entropy [N] or [0] when not compute_entropy, lse [N]),
    in the accumulation dtype; rows with target ignore_index give 0 and are never computed."""
    n = hidden.shape[0]
    params = KernelParams(compute_entropy, deterministic, grad_filter)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    if rows.numel() == 0:  # every target ignored: nothing to compute
        acc = accumulation_dtype(hidden.dtype)
        zeros = hidden.new_zeros((n,), dtype=acc)
        return zeros, zeros.clone() if compute_entropy else zeros.new_zeros(0), zeros.clone()
    sub = (lambda x: x) if rows.numel() == n else (lambda x: x.index_select(0, rows))
    lp, ent, lse = registry.get(backend).forward(
        sub(hidden).contiguous(), weight.contiguous(), bias, sub(targets), sub(inv_temp), params
    )
    entropy = _scatter_rows(ent, rows, n) if compute_entropy else ent
    return _scatter_rows(lp, rows, n), entropy, _scatter_rows(lse, rows, n)


@fused_lle.register_fake
def _fused_lle_fake(hidden, weight, bias, targets, inv_temp, ignore_index, backend, compute_entropy,
                    deterministic, grad_filter):
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    entropy = hidden.new_empty((n,) if compute_entropy else (0,), dtype=acc)
    return hidden.new_empty((n,), dtype=acc), entropy, hidden.new_empty((n,), dtype=acc)


@torch.library.custom_op("prepo_kernels::fused_lle_backward", mutates_args=())
def fused_lle_backward(
    grad_logprob: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, inv_temp: Tensor, lse: Tensor, entropy: Tensor,
    ignore_index: int, backend: str, compute_entropy: bool, deterministic: bool, grad_filter: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_logprob * logprob + grad_entropy * entropy) for :func:`fused_lle`'s
    inputs: (grad_hidden [N, D] in hidden's dtype, grad_weight [V, D] in weight's dtype, grad_bias
    [V] in bias' dtype or [0] without bias). Only rows with a valid target and a non-zero upstream
    gradient reach the backend; the others get exactly 0."""
    params = KernelParams(compute_entropy, deterministic, grad_filter)
    acc = lse.dtype
    g = grad_logprob.to(acc)
    e = grad_entropy.to(acc) if compute_entropy and grad_entropy is not None else None
    live = (targets != ignore_index) & ((g != 0) if e is None else (g != 0) | (e != 0))
    keep = live.nonzero().squeeze(1)
    grad_h = torch.zeros_like(hidden)
    if keep.numel() == 0:
        grad_b = torch.zeros_like(bias) if bias is not None else weight.new_empty(0)
        return grad_h, torch.zeros_like(weight), grad_b
    pick = lambda x: x.index_select(0, keep)  # noqa: E731
    dh, dw, db = registry.get(backend).backward(
        pick(g), None if e is None else pick(e), pick(hidden).contiguous(), weight.contiguous(), bias,
        pick(targets), pick(inv_temp), pick(lse), pick(entropy) if e is not None else entropy, params,
    )
    grad_h.index_copy_(0, keep, dh.to(hidden.dtype))
    grad_b = db.to(bias.dtype) if bias is not None else weight.new_empty(0)
    return grad_h, dw.to(weight.dtype), grad_b


@fused_lle_backward.register_fake
def _fused_lle_backward_fake(grad_logprob, grad_entropy, hidden, weight, bias, *_):
    grad_b = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_b


_CONFIG = ("ignore_index", "backend", "compute_entropy", "deterministic", "grad_filter")


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, *config = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, inv_temp, lse, entropy)
    ctx.config = config
    ctx.mark_non_differentiable(lse)  # only used by the backward; never exposed


def _backward(ctx, grad_logprob, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, inv_temp, lse, entropy = ctx.saved_tensors
    compute_entropy = ctx.config[_CONFIG.index("compute_entropy")]
    if grad_logprob is None:
        grad_logprob = torch.zeros_like(lse)
    grad_h, grad_w, grad_b = fused_lle_backward(
        grad_logprob, grad_entropy if compute_entropy else None, hidden, weight, bias, targets, inv_temp,
        lse, entropy, *ctx.config,
    )
    return grad_h, grad_w, grad_b if bias is not None else None, None, None, None, None, None, None, None


fused_lle.register_autograd(_backward, setup_context=_setup_context)


def linear_logprob_entropy_rows(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temp: Tensor,
    ignore_index: int, backend: str, params: KernelParams,
) -> tuple[Tensor, Tensor]:
    """(logprob [N], entropy [N] or [0]) through :func:`fused_lle`; differentiable w.r.t. hidden,
    weight and bias. Inputs as in ``backends/base.py`` except that targets may hold ignore_index."""
    logprob, entropy, _ = fused_lle(
        hidden, weight, bias, targets, inv_temp, ignore_index, backend,
        params.compute_entropy, params.deterministic, params.grad_filter,
    )
    return logprob, entropy
