"""The backends of :func:`prepo_kernels.linear_grpo_loss` and the clipped surrogate they share.

Contract (every backend in BACKENDS), on dense rows only: the caller has dropped rows whose target
is ignore_index or whose advantage is 0 and flattened the leading dims.

    fwdbwd(hidden [n, D], weight [V, D], bias [V] or None, targets [n] int64 in [0, V),
           inv_temp [n], old_logprob [n] or None, advantages [n]   (accumulation dtype: fp32, fp64 for fp64),
           scale: float (1 / the token-mean's denominator), eps_low, eps_high: float,
           compute_entropy, need_grad: bool)
      -> (logprob [n], entropy [n] or [0], grad_hidden [n, D] or [0], grad_weight [V, D] or [0],
          grad_bias [V] or [0])

logprob / entropy / grad_hidden / grad_bias in the accumulation dtype, grad_weight in the weight's
(accumulated there across row chunks: no [V, D] buffer besides it). With z = (h W^T + b) * inv_temp, p = softmax(z),
r = exp(logprob - old_logprob) (exactly 1 when old_logprob is None: on-policy, the old log-probs are
the new ones, detached) and A the advantage, the loss is -scale * sum_rows surr, and

    dL/dlogprob = g = -scale * A * r   where the unclipped branch is the minimum, else 0
    dL/dz_v     = g * (1[v = y] - p_v)
    grad_hidden = (dL/dz * inv_temp) W,  grad_weight = (dL/dz * inv_temp)^T h,  grad_bias = column sums.

Both backends take the rows in chunks and hold one chunk's full-vocabulary logits [rows, V] at a
time: matmul 1 gives them, g follows from the row's own log-prob, dL/dz overwrites the logits, and
matmuls 2 and 3 give dh and add the chunk's share of dW. No logits are recomputed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends.base import accumulation_dtype

OP = "prepo_kernels::grpo_loss_fwdbwd"
# bytes of one chunk's fp32 logits (rows x V): the chunk's rows are max(16, min(1024, this / 4V)).
# Larger chunks mean fewer read-modify-writes of the [V, D] dW (faster), and more memory.
CHUNK_BYTES = 32 << 20


def clipped_surrogate(logprob: Tensor, old_logprob: Optional[Tensor], advantages: Tensor, eps_low: float,
                      eps_high: float) -> tuple[Tensor, Tensor]:
    """Per token, exactly as ``prepo.loss.grpo_loss``: (surr = min(r A, clip(r, 1 - eps_low,
    1 + eps_high) A), clipped = whether the clipped branch is strictly the minimum), r = exp(logprob -
    old_logprob), old_logprob None meaning ``logprob.detach()`` (r = 1). Differentiable in logprob:
    d surr / d logprob = r A where not clipped, else 0."""
    ratio = torch.exp(logprob - (logprob.detach() if old_logprob is None else old_logprob))
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return torch.minimum(surr1, surr2), surr2 < surr1


def surrogate_grad(logprob: Tensor, old_logprob: Optional[Tensor], advantages: Tensor, eps_low: float,
                   eps_high: float) -> Tensor:
    """d surr / d logprob of :func:`clipped_surrogate`, in closed form: r A where not clipped, else 0
    (inside the clip range both branches are equal and torch.minimum's split gradients add up to r A)."""
    _, clipped = clipped_surrogate(logprob, old_logprob, advantages, eps_low, eps_high)
    ratio = 1 if old_logprob is None else torch.exp(logprob - old_logprob)
    return torch.where(clipped, 0, ratio * advantages)


# bytes of one fp32 tile of W (and one of dW) that the C++ backend upcasts (computes) at a time for
# bf16 / fp16 weights: tile_rows(D) vocab rows. Larger tiles mean larger GEMMs and fewer, longer
# conversions (1024-row tiles took 1.56x the time of 4096-row ones at N, D, V = 1024, 512, 8192 bf16).
TILE_BYTES = 8 << 20


def chunk_rows(vocab: int) -> int:
    return max(16, min(1024, CHUNK_BYTES // (4 * vocab)))


def tile_rows(dim: int) -> int:
    return max(16, TILE_BYTES // (4 * dim))


def torch_fwdbwd(hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, eps_low, eps_high,
                 compute_entropy, need_grad):
    """The contract above in plain PyTorch (any device). The matmuls run in the inputs' dtype, as
    the reference's logits do; softmax and dL/dz in the accumulation dtype; dW accumulates in the
    weight's dtype (bf16 / fp16: one rounding per row chunk, no [V, D] fp32 buffer)."""
    acc = accumulation_dtype(hidden.dtype)
    n, D, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    logprob = hidden.new_empty((n,), dtype=acc)
    entropy = hidden.new_empty((n if compute_entropy else 0,), dtype=acc)
    grad_h = hidden.new_empty((n, D) if need_grad else (0,), dtype=acc)
    grad_w = weight.new_zeros((V, D) if need_grad else (0,))
    grad_b = weight.new_zeros((V,) if need_grad and bias is not None else (0,), dtype=acc)
    step = chunk_rows(V)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        h = hidden[rows]
        z = h @ weight.T
        if bias is not None:
            z += bias
        logp = z.to(acc).mul_(inv_temp[rows, None])
        logp -= torch.logsumexp(logp, dim=1, keepdim=True)
        y = targets[rows, None]
        logprob[rows] = lp = logp.gather(1, y).squeeze(1)
        p = logp.exp_()  # logp is not needed again; -inf logits give p = 0
        if compute_entropy:
            entropy[rows] = -torch.where(p > 0, p * torch.log(p), 0).sum(1)
        if not need_grad:
            continue
        old = None if old_logprob is None else old_logprob[rows]
        g = -scale * surrogate_grad(lp, old, advantages[rows], eps_low, eps_high)
        dz = p.mul_(-g[:, None]).scatter_add_(1, y, g[:, None]).mul_(inv_temp[rows, None])
        if bias is not None:
            grad_b += dz.sum(0)
        dz = dz.to(hidden.dtype)
        grad_h[rows] = dz @ weight
        grad_w.addmm_(dz.T, h)
    return logprob, entropy, grad_h, grad_w, grad_b


def cpu_fwdbwd(hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, eps_low, eps_high,
               compute_entropy, need_grad):
    """The contract above in C++ (csrc/cpu/grpo_loss_cpu.cpp)."""
    return torch.ops.prepo_kernels.grpo_loss_fwdbwd(
        hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, eps_low, eps_high,
        compute_entropy, need_grad, chunk_rows(weight.shape[0]), tile_rows(weight.shape[1]))


BACKENDS = {"torch": torch_fwdbwd, "cpu": cpu_fwdbwd}


def grpo_unavailable_reason(name: str) -> Optional[str]:
    """None when linear_grpo_loss can run backend ``name`` (already resolved by the registry, so
    available for the device), else why not."""
    if name not in BACKENDS:
        return f"no {name!r} backend for the fused GRPO loss (it has {sorted(BACKENDS)} and 'reference')"
    if name == "cpu" and not hasattr(torch.ops.prepo_kernels, OP.split("::")[1]):
        return ("the native extension was built without csrc/cpu/grpo_loss_cpu.cpp; rebuild it with "
                "`pip install --no-build-isolation -e .`")
    return None

