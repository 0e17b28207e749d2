"""Vocab-parallel (tensor-parallel) LM head: ``linear_logprob_entropy(..., process_group=tp)``.

Layout (Megatron's vocab-parallel LM head, verl's fused kernel): the W ranks of ``process_group`` each
hold a contiguous shard of the LM-head rows in rank order -- rank r holds global rows [r*Vs, (r+1)*Vs),
every shard the same size Vs, V = W*Vs -- and every rank passes the same hidden states, the same
targets (GLOBAL token ids), temperature and ignore_index. Every rank gets the global log-prob and
entropy over all V columns, without any rank holding more than its [N, Vs] logits tile by tile.

Math. On its shard, rank r runs a fused backend (``backends/base.py``) and gets, per row,
lse_r (log-sum-exp over its Vs logits), H_r (entropy of the softmax over its own columns) and
lp_r = z_y - lse_r (meaningful only on the rank that owns the target).
One ``all_gather`` of these [2 or 3, n] statistics then gives every rank, per row,
    lse     = logsumexp_r lse_r
    logprob = lp_o + (lse_o - lse)              o = y // Vs, the rank owning the target
    entropy = sum_r w_r (H_r + lse - lse_r)     w_r = exp(lse_r - lse), the mass of shard r
(the entropy is the chain rule H = H(shard) + E_shard[H within shard]; every term is >= 0, so
nothing cancels). Backward needs no communication: given the GLOBAL lse and entropy, the backend's
    dz_v = g (1[v=y] - p_v) - e p_v (z_v - lse + H)
is exactly the global dz restricted to this shard. A row whose target lives on another rank must get
no g * 1[v=y] term here: backward points it at an extra dummy column (a zero weight row with a -inf
logit) appended to a transient copy of the shard, so that term lands only in dropped gradient entries
and adds exactly 0 to dh, whatever precision the backend rounds dz to. (Forward uses column 0 as the
dummy: it only affects lp_r on ranks not owning the target, which is never read.)

Collectives per call: forward 2 -- an ``all_gather`` of 9 int64 per rank that checks the inputs
agree across ranks (shard rows, hidden shape, dtype, bias, compute_entropy, ignore_index, a
checksum of the targets), and the ``all_gather`` of the statistics; backward 0.

Hidden gradient convention (Megatron's and verl's): the gradient w.r.t. ``hidden`` is this rank's
PARTIAL sum, through its own vocab shard only; the caller reduces it over the group. In Megatron
that is what the LM head's input region already does -- ``copy_to_tensor_model_parallel_region``
(all-reduce in backward) or, with sequence parallelism, ``gather_from_sequence_parallel_region``
(reduce-scatter in backward) -- so pass the hidden states through it as for the unfused head.
Without Megatron, wrap them in :func:`copy_to_vocab_parallel` below. The weight (and bias) gradient
is this rank's shard of the global one and needs no reduction.

Example (every rank of ``tp`` runs the same code):

    import torch.distributed as dist
    from prepo_kernels import linear_logprob_entropy, copy_to_vocab_parallel

    tp = dist.new_group(...)                      # the tensor-parallel group, W ranks
    r, W = dist.get_rank(tp), dist.get_world_size(tp)
    vs = vocab // W
    shard = lm_head_weight[r * vs:(r + 1) * vs]   # [Vs, D], this rank's rows (an nn.Parameter)
    h = copy_to_vocab_parallel(hidden, tp)        # Megatron: its own copy_to/gather region instead
    logprob, entropy = linear_logprob_entropy(h, shard, targets, temperature=0.7, process_group=tp)
    loss = -(advantages * logprob).mean()         # identical on every rank
    loss.backward()                               # hidden.grad: full gradient; shard.grad: its rows

Inputs are checked on each rank (dtypes, shapes, temperature) before any collective, then across
ranks; a check that fails on one rank only raises there and leaves the others waiting in the
check's ``all_gather`` until the group's timeout. Hidden states and temperatures are assumed equal
across ranks (not checked: it would cost an all-reduce of [N, D]).

The fused backends run here: "torch", "cpu", "cuda", "triton" (one rank per device). "reference"
is not: it materializes the logits and differentiates them with torch autograd, which cannot see
the collective; compare against the unsharded op with impl="reference" instead.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from . import validation
from .backends import registry
from .backends.base import KernelParams, accumulation_dtype


def vocab_parallel_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    process_group: dist.ProcessGroup,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: validation.Temperature = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    impl: str = "auto",
    params: Optional[KernelParams] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``prepo_kernels.linear_logprob_entropy`` with ``weight`` [Vs, D] (and ``bias`` [Vs]) this rank's
    vocab shard of an LM head sharded over ``process_group``; ``targets`` are global ids in [0, Vs * W).
    Returns the global (logprob, entropy), each float32 (float64 for float64 inputs) with targets' shape,
    identical on every rank. The hidden gradient is this rank's partial sum (module docstring)."""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    validation.check_tensor("targets", targets, integer=True)
    # every check but the target range, which is against the global vocab (below), not this shard's rows
    validation.check_linear_inputs(hidden, weight, torch.full_like(targets, ignore_index), bias, ignore_index)
    backend = registry.resolve(impl, hidden.device)
    if backend == "reference":
        raise ValueError(
            "impl='reference' does not support process_group (it differentiates materialized logits with "
            "torch autograd, which cannot see the collective); use a fused impl such as 'torch'"
        )
    inv_temp = validation.temperature_per_row(temperature, targets, accumulation_dtype(hidden.dtype))
    params = dataclasses.replace(params or KernelParams(), compute_entropy=compute_entropy)
    y = targets.reshape(-1).long()
    world = _check_same_on_every_rank(process_group, hidden, weight, bias, y, ignore_index, compute_entropy)
    y = validation.checked_targets(y, weight.shape[0] * world, ignore_index)
    logprob, entropy = VocabParallelLinearLogprobEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, y, inv_temp, ignore_index, backend, params, process_group
    )
    shape = targets.shape
    return logprob.view(shape), entropy.view(shape) if compute_entropy else None


def copy_to_vocab_parallel(hidden: torch.Tensor, process_group: dist.ProcessGroup) -> torch.Tensor:
    """Identity in forward; in backward all-reduces (sums) the gradient over ``process_group``.

    Wrap the hidden states in it before a vocab-parallel ``linear_logprob_entropy`` to get the full
    hidden gradient on every rank (Megatron's ``copy_to_tensor_model_parallel_region``; Megatron users
    keep using theirs, and must not wrap twice)."""
    return _CopyToVocabParallel.apply(hidden, process_group)


class _CopyToVocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, process_group):
        ctx.process_group = process_group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.process_group)
        return grad, None


def _check_same_on_every_rank(group, hidden, weight, bias, y, ignore_index, compute_entropy) -> int:
    """One all_gather of what must agree across ranks; every rank raises the same error. Returns W."""
    pos = torch.arange(1, y.numel() + 1, device=y.device)
    fields = {  # name -> int64 values
        "weight rows (every rank must hold an equal shard: rank r holds global rows [r*Vs, (r+1)*Vs))":
            [weight.shape[0]],
        "hidden size D": [hidden.shape[-1]],
        "number of tokens": [y.numel()],
        f"hidden dtype (index into {[str(t) for t in validation.FLOAT_DTYPES]})":
            [validation.FLOAT_DTYPES.index(hidden.dtype)],
        "use of a bias": [bias is not None],
        "compute_entropy": [compute_entropy],
        "ignore_index": [ignore_index],
        # two checksums (they wrap around identically on every rank)
        "targets (every rank must pass the same GLOBAL token ids, not ids local to its shard)":
            [y.sum(), (y * pos).sum()],
    }
    local = torch.stack([torch.as_tensor(v, dtype=torch.int64, device=y.device)
                         for values in fields.values() for v in values])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts).tolist()  # [W, fields]
    col = 0
    for name, values in fields.items():
        per_rank = [row[col:col + len(values)] for row in table]
        col += len(values)
        if any(v != per_rank[0] for v in per_rank):
            shown = f": {[v[0] for v in per_rank]} by rank" if len(values) == 1 else ""
            raise ValueError(f"vocab-parallel inputs differ across the ranks of process_group in {name}{shown}")
    return len(table)


def _rows(x: torch.Tensor, rows: torch.Tensor, all_rows: bool) -> torch.Tensor:
    return x if all_rows else x.index_select(0, rows)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    if values.shape[0] == n:
        return values
    return values.new_zeros((n,) + values.shape[1:]).index_copy_(0, rows, values)


def _global_stats(lp, ent, lse_r, owner, group, compute_entropy):
    """Per-rank shard statistics [n] -> global (logprob, entropy or empty, lse), one all_gather."""
    local = torch.stack([lse_r, lp, ent] if compute_entropy else [lse_r, lp])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    stats = torch.stack(parts)  # [W, k, n]
    lse_all = stats[:, 0]
    lse = torch.logsumexp(lse_all, dim=0)
    at_owner = lambda x: x.gather(0, owner[None]).squeeze(0)  # noqa: E731
    logprob = at_owner(stats[:, 1]) + (at_owner(lse_all) - lse)
    if not compute_entropy:
        return logprob, lse.new_empty(0), lse
    w = (lse_all - lse).exp()
    # a shard whose logits are all -inf has w = 0 and a NaN H_r: it contributes nothing
    entropy = torch.where(w > 0, w * (stats[:, 2] + (lse - lse_all)), 0).sum(0)
    return logprob, entropy, lse


class VocabParallelLinearLogprobEntropy(torch.autograd.Function):
    """(hidden [N, D], weight shard [Vs, D], bias shard [Vs]|None, global targets [N], inv_temp [N]) ->
    global (logprob [N], entropy [N] or empty). Rows with target ignore_index are dropped before any
    matmul; in backward, rows whose upstream gradients are both zero are dropped."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, ignore_index, backend, params, group):
        n, vs = hidden.shape[0], weight.shape[0]
        rank = dist.get_rank(group)
        rows = (targets != ignore_index).nonzero().squeeze(1)
        all_rows = rows.numel() == n
        y = _rows(targets, rows, all_rows)
        owner = torch.div(y, vs, rounding_mode="floor")
        owned = owner == rank
        local_y = torch.where(owned, y - rank * vs, 0)  # dummy column 0 where another rank owns the target
        if rows.numel():  # the same on every rank (targets were checked equal), so no rank skips the collective
            lp, ent, lse_r = registry.get(backend).forward(
                _rows(hidden, rows, all_rows).contiguous(), weight.contiguous(), bias, local_y,
                _rows(inv_temp, rows, all_rows), params)
            lp, ent, lse = _global_stats(lp, ent, lse_r, owner, group, params.compute_entropy)
        else:
            lp = ent = lse = inv_temp.new_zeros(0)
        logprob = _scatter_rows(lp, rows, n)
        entropy = _scatter_rows(ent, rows, n) if params.compute_entropy else ent
        if not params.compute_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, inv_temp, rows, local_y, owned, lse, ent)
        ctx.backend, ctx.params = backend, params
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, inv_temp, rows, local_y, owned, lse, ent = ctx.saved_tensors
        params = ctx.params
        g = grad_logprob.index_select(0, rows)
        e = grad_entropy.index_select(0, rows) if params.compute_entropy and grad_entropy is not None else None
        live = (g != 0) if e is None else (g != 0) | (e != 0)
        keep = live.nonzero().squeeze(1)
        if keep.numel() == 0:
            return (None,) * 9
        sel = rows.index_select(0, keep)
        pick = lambda x: x.index_select(0, keep)  # noqa: E731
        owned, weight_b, bias_b = pick(owned), weight.contiguous(), bias
        if not bool(owned.all()):
            weight_b, bias_b = _append_dummy_column(weight_b, bias)
        vs = weight.shape[0]
        y = torch.where(owned, pick(local_y), vs)  # targets on other ranks -> the dummy column
        grad_h, grad_w, grad_b = registry.get(ctx.backend).backward(
            pick(g), None if e is None else pick(e), hidden.index_select(0, sel).contiguous(), weight_b, bias_b,
            y, inv_temp.index_select(0, sel), pick(lse), ent if e is None else pick(ent), params,
        )
        full_h = hidden.new_zeros(hidden.shape).index_copy_(0, sel, grad_h.to(hidden.dtype))
        grad_b = None if bias is None else grad_b[:vs].to(bias.dtype)
        return full_h, grad_w[:vs].to(weight.dtype), grad_b, None, None, None, None, None, None


def _append_dummy_column(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """weight [Vs, D] -> [Vs + 1, D] with a zero last row, bias -> [Vs + 1] with -inf last (zeros before
    it when there was no bias), so the extra column has z = -inf and p = 0 for every row.

    Rows whose target lives on another rank point at this column in backward: its dz (the g * 1[v=y]
    term) then reaches only the dropped last entries of dW and db and adds dz * 0 to dh. Exact whatever
    precision the backend rounds dz to (subtracting g * W[0] after a column-0 dummy leaves a 2^-9 |g|
    error per row in row 0 of dW when dz is rounded to bf16); the cost is one transient copy of the
    shard per backward."""
    weight = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    bias = weight.new_zeros(weight.shape[0] - 1) if bias is None else bias
    return weight, torch.cat([bias, bias.new_full((1,), float("-inf"))])
