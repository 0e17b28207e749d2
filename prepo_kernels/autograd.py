"""The one autograd path of every fused backend, unsharded and vocab-parallel: two custom ops,
``prepo_kernels::fused_lle`` and its backward ``prepo_kernels::fused_lle_backward``.

They do the work that is the same for all backends and exact: drop rows whose target is
ignore_index before any matmul, and in backward drop rows whose upstream gradients are both zero
(in GRPO every token of a zero-advantage group) -- no recompute, no dh/dW contribution. Picking
those rows depends on the data (``nonzero``), so it lives inside the ops, where ``torch.compile``
does not look: a compiled caller sees two opaque ops with fake (shape-only) kernels and no graph
break, and the row skipping still happens when the compiled graph runs.

With a process group (``group_name``, the name of a ``torch.distributed`` group) the weight is this
rank's vocab shard and the targets are global ids: forward maps them to the shard and combines the
ranks' statistics with one all_gather, backward maps them again and needs no collective
(``prepo_kernels.vocab_parallel`` holds that math).

The backend and the :class:`KernelParams` fields travel as plain str/bool arguments, so the ops'
schemas are fixed and the compiler can put them in a graph; inside, they become the one record
(:class:`ForwardInputs` / :class:`BackwardInputs`) a backend takes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import vocab_parallel
from .backends import registry
from .backends.base import BackwardInputs, ForwardInputs, KernelParams, accumulation_dtype

_NO_GROUP = ""


def _scatter_rows(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """values [k, ...] of the rows ``rows`` -> [n, ...], zero elsewhere."""
    if values.shape[0] == n:
        return values
    return values.new_zeros((n,) + values.shape[1:]).index_copy_(0, rows, values)


def _row_picker(rows: Tensor, n: int) -> Callable[[Tensor], Tensor]:
    """x [n, ...] -> x[rows] (x itself when ``rows`` are all n rows)."""
    if rows.numel() == n:
        return lambda x: x
    return lambda x: x.index_select(0, rows)


def _group(group_name: str) -> Optional[dist.ProcessGroup]:
    if group_name == _NO_GROUP:
        return None
    return dist.distributed_c10d._resolve_process_group(group_name)


def group_name_of(process_group: Optional[dist.ProcessGroup]) -> str:
    """The ``group_name`` argument of the ops for ``process_group`` (None: unsharded)."""
    return _NO_GROUP if process_group is None else process_group.group_name


@torch.library.custom_op("prepo_kernels::fused_lle", mutates_args=())
def fused_lle(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temp: Tensor,
    ignore_index: int, backend: str, compute_entropy: bool, deterministic: bool, grad_filter: bool,
    group_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, D], weight [V, D] (this rank's shard [Vs, D] with a group), bias [V] or None,
    targets [N] int64 (checked by the caller: in [0, V) -- [0, Vs * W) with a group -- or
    ignore_index), inv_temp [N] -> (logprob [N], entropy [N] or [0] when not compute_entropy, lse [N]),
    in the accumulation dtype, global over the vocabulary; rows with target ignore_index give 0 and
    are never computed."""
    n = hidden.shape[0]
    rows = (targets != ignore_index).nonzero().squeeze(1)
    if rows.numel() == 0:  # every target ignored (on every rank alike): nothing to compute
        zeros = hidden.new_zeros((n,), dtype=accumulation_dtype(hidden.dtype))
        return zeros, zeros.clone() if compute_entropy else zeros.new_empty(0), zeros.clone()
    pick = _row_picker(rows, n)
    group, y = _group(group_name), pick(targets)
    if group is not None:
        owner, y = vocab_parallel.forward_targets(y, weight.shape[0], group)
    params = KernelParams(compute_entropy, deterministic, grad_filter)
    stats = registry.get(backend).forward(
        ForwardInputs(pick(hidden).contiguous(), weight.contiguous(), bias, y, pick(inv_temp), params))
    if group is not None:
        stats = vocab_parallel.global_stats(*stats, owner, group, compute_entropy)
    lp, ent, lse = stats
    entropy = _scatter_rows(ent, rows, n) if compute_entropy else ent
    return _scatter_rows(lp, rows, n), entropy, _scatter_rows(lse, rows, n)


@fused_lle.register_fake
def _fused_lle_fake(hidden, weight, bias, targets, inv_temp, ignore_index, backend, compute_entropy, *_):
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    entropy = hidden.new_empty((n,) if compute_entropy else (0,), dtype=acc)
    return hidden.new_empty((n,), dtype=acc), entropy, hidden.new_empty((n,), dtype=acc)


@torch.library.custom_op("prepo_kernels::fused_lle_backward", mutates_args=())
def fused_lle_backward(
    grad_logprob: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, inv_temp: Tensor, lse: Tensor, entropy: Tensor,
    ignore_index: int, backend: str, compute_entropy: bool, deterministic: bool, grad_filter: bool,
    group_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_logprob * logprob + grad_entropy * entropy) for :func:`fused_lle`'s
    inputs: (grad_hidden [N, D] in hidden's dtype -- with a group this rank's partial sum --,
    grad_weight [V, D] in weight's dtype, grad_bias [V] in bias' dtype or [0] without bias). Only rows
    with a valid target and a non-zero upstream gradient reach the backend; the others get exactly 0."""
    acc = lse.dtype
    g = grad_logprob.to(acc)
    e = grad_entropy.to(acc) if compute_entropy and grad_entropy is not None else None
    live = (targets != ignore_index) & ((g != 0) if e is None else (g != 0) | (e != 0))
    keep = live.nonzero().squeeze(1)
    grad_h = torch.zeros_like(hidden)
    if keep.numel() == 0:
        grad_b = torch.zeros_like(bias) if bias is not None else weight.new_empty(0)
        return grad_h, torch.zeros_like(weight), grad_b
    pick = _row_picker(keep, hidden.shape[0])
    group, y, weight_b, bias_b = _group(group_name), pick(targets), weight.contiguous(), bias
    if group is not None:
        y, weight_b, bias_b = vocab_parallel.backward_targets(y, weight_b, bias, group)
    dh, dw, db = registry.get(backend).backward(BackwardInputs(
        pick(hidden).contiguous(), weight_b, bias_b, y, pick(inv_temp),
        KernelParams(compute_entropy, deterministic, grad_filter),
        grad_logprob=pick(g), grad_entropy=None if e is None else pick(e), lse=pick(lse),
        entropy=entropy if e is None else pick(entropy),
    ))
    grad_h.index_copy_(0, keep, dh.to(hidden.dtype))
    if dw.shape[0] != weight.shape[0]:  # drop the vocab-parallel dummy column
        dw, db = dw[:weight.shape[0]], None if db is None else db[:weight.shape[0]]
    grad_b = db.to(bias.dtype) if bias is not None else weight.new_empty(0)
    return grad_h, dw.to(weight.dtype), grad_b


@fused_lle_backward.register_fake
def _fused_lle_backward_fake(grad_logprob, grad_entropy, hidden, weight, bias, *_):
    grad_b = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_b


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, *config = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, inv_temp, lse, entropy)
    ctx.config = config
    ctx.mark_non_differentiable(lse)  # only used by the backward; never exposed


def _backward(ctx, grad_logprob, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, inv_temp, lse, entropy = ctx.saved_tensors
    if grad_logprob is None:
        grad_logprob = torch.zeros_like(lse)
    grad_h, grad_w, grad_b = fused_lle_backward(
        grad_logprob, grad_entropy, hidden, weight, bias, targets, inv_temp, lse, entropy, *ctx.config)
    return (grad_h, grad_w, grad_b if bias is not None else None) + (None,) * (2 + len(ctx.config))


fused_lle.register_autograd(_backward, setup_context=_setup_context)
