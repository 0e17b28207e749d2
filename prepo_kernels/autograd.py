"""The autograd layer shared by every fused backend.

It does the work that is the same for all backends and exact: drop rows whose target is
ignore_index before any matmul, and in backward drop rows whose upstream gradients are both
zero (in GRPO every token of a zero-advantage group) -- no recompute, no dh/dW contribution.
"""
from __future__ import annotations

import torch

from .backends import registry
from .backends.base import KernelParams


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    if values.shape[0] == n:
        return values
    out = values.new_zeros((n,) + values.shape[1:])
    return out.index_copy_(0, rows, values)


class LinearLogprobEntropy(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], bias [V]|None, targets [N], inv_temp [N]) -> (logprob [N], entropy [N]).

    entropy is an empty tensor when params.compute_entropy is False."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, ignore_index: int, backend: str, params: KernelParams):
        n = hidden.shape[0]
        rows = (targets != ignore_index).nonzero().squeeze(1)
        all_valid = rows.numel() == n
        sub = (lambda x: x) if all_valid else (lambda x: x.index_select(0, rows))
        impl = registry.get(backend)
        if rows.numel():
            lp, ent, lse = impl.forward(sub(hidden).contiguous(), weight.contiguous(), bias, sub(targets),
                                        sub(inv_temp), params)
        else:
            lp = lse = ent = inv_temp.new_zeros(0)  # every target ignored: nothing to compute
        logprob = _scatter_rows(lp, rows, n)
        entropy = _scatter_rows(ent, rows, n) if params.compute_entropy else ent
        if not params.compute_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, inv_temp, rows, lse, ent)
        ctx.backend, ctx.params = backend, params
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, targets, inv_temp, rows, lse, ent = ctx.saved_tensors
        params = ctx.params
        g = grad_logprob.index_select(0, rows)
        e = grad_entropy.index_select(0, rows) if params.compute_entropy and grad_entropy is not None else None
        live = (g != 0) if e is None else (g != 0) | (e != 0)
        keep = live.nonzero().squeeze(1)
        if keep.numel() == 0:
            return None, None, None, None, None, None, None, None
        sel = rows.index_select(0, keep)
        pick = lambda x: x if x is None else x.index_select(0, keep)  # noqa: E731
        grad_h, grad_w, grad_b = registry.get(ctx.backend).backward(
            pick(g), pick(e), hidden.index_select(0, sel).contiguous(), weight.contiguous(), bias,
            targets.index_select(0, sel), inv_temp.index_select(0, sel), pick(lse),
            pick(ent) if e is not None else ent, params,
        )
        full_h = hidden.new_zeros(hidden.shape).index_copy_(0, sel, grad_h.to(hidden.dtype))
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return full_h, grad_w.to(weight.dtype), grad_b, None, None, None, None, None
