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

This module holds the shard math only (the cross-rank check, the target mapping, the merge of the
ranks' statistics, the dummy column). It runs inside the one autograd path every fused call takes,
the custom ops ``prepo_kernels::fused_lle`` / ``fused_lle_backward`` (``prepo_kernels.autograd``),
which get the group by name; the row dropping there is the same as without a group.

The fused backends run here: "torch", "cpu", "cuda", "triton" (one rank per device). "reference"
is not: it materializes the logits and differentiates them with torch autograd, which cannot see
the collective; compare against the unsharded op with impl="reference" instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import validation


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


def check_same_on_every_rank(group, hidden, weight, bias, targets, ignore_index, compute_entropy) -> int:
    """One all_gather of what must agree across the ranks of ``group`` (shapes, dtype, options, a
    checksum of the targets); every rank raises the same ValueError. Returns the world size W."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    y = targets.reshape(-1).long()
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


def forward_targets(y: torch.Tensor, vs: int, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Global targets [n] -> (owner [n], the rank holding each target; the target's column in this
    rank's shard [n], column 0 -- a dummy, never read -- where another rank owns it)."""
    rank = dist.get_rank(group)
    owner = torch.div(y, vs, rounding_mode="floor")
    return owner, torch.where(owner == rank, y - rank * vs, 0)


def backward_targets(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group: dist.ProcessGroup):
    """Global targets [n], this rank's weight [Vs, D] and bias -> (targets in the shard, weight, bias)
    for the backend's backward: a target another rank owns points at an extra dummy column (see
    :func:`_append_dummy_column`), added only when some row needs it."""
    vs, rank = weight.shape[0], dist.get_rank(group)
    owned = torch.div(y, vs, rounding_mode="floor") == rank
    if not bool(owned.all()):
        weight, bias = _append_dummy_column(weight, bias)
    return torch.where(owned, y - rank * vs, vs), weight, bias


def global_stats(lp, ent, lse_r, owner, group, compute_entropy):
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
