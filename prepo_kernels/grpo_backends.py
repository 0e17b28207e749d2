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

Every backend takes the rows in chunks and holds one chunk's full-vocabulary logits [rows, V] at a
time: matmul 1 gives them, g follows from the row's own log-prob, dL/dz overwrites the logits, and
matmuls 2 and 3 give dh and add the chunk's share of dW. No logits are recomputed. "torch" and
"triton" share that loop (:func:`chunked_fwdbwd`, torch matmuls) and differ in the row pass: torch
ops, or one Triton kernel (prepo_kernels/triton/grpo_rows.py; tested under Triton's interpreter
and compiled for sm_90 by aot_check, not yet run on a GPU); "cpu" is the same scheme in C++.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import registry
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


def chunked_fwdbwd(row_pass, hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, eps_low,
                   eps_high, compute_entropy, need_grad):
    """The contract above as a loop over row chunks, any device: the chunk's logits z = h W^T + b
    (matmul 1, in the inputs' dtype as the reference's logits, then in the accumulation dtype), then

        row_pass(z [c, V], targets [c], inv_temp [c], old_logprob [c] or None, advantages [c],
                 logprob [c], entropy [c] or None, scale, eps_low, eps_high, need_grad)

    writes the chunk's log-probs (and entropies) into the given views and, with ``need_grad``,
    overwrites z with dL/dz * inv_temp; then dh (matmul 2), dW (matmul 3, accumulated in the
    weight's dtype: for bf16 / fp16 one rounding per row chunk, no [V, D] fp32 buffer) and db."""
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
        z = z.to(acc)
        row_pass(z, targets[rows], inv_temp[rows], None if old_logprob is None else old_logprob[rows],
                 advantages[rows], logprob[rows], entropy[rows] if compute_entropy else None, scale, eps_low,
                 eps_high, need_grad)
        if not need_grad:
            continue
        if bias is not None:
            grad_b += z.sum(0)
        dz = z.to(hidden.dtype)
        grad_h[rows] = dz @ weight
        grad_w.addmm_(dz.T, h)
    return logprob, entropy, grad_h, grad_w, grad_b


def torch_rows(z, targets, inv_temp, old_logprob, advantages, logprob, entropy, scale, eps_low, eps_high,
               need_grad):
    """chunked_fwdbwd's row pass in torch ops (log-softmax, gather, entropy, dL/dz), on z in place."""
    logp = z.mul_(inv_temp[:, None])
    logp -= torch.logsumexp(logp, dim=1, keepdim=True)
    y = targets[:, None]
    logprob.copy_(logp.gather(1, y).squeeze(1))
    p = logp.exp_()  # logp is not needed again; -inf logits give p = 0
    if entropy is not None:
        entropy.copy_(-torch.where(p > 0, p * torch.log(p), 0).sum(1))
    if need_grad:
        g = -scale * surrogate_grad(logprob, old_logprob, advantages, eps_low, eps_high)
        p.mul_(-g[:, None]).scatter_add_(1, y, g[:, None]).mul_(inv_temp[:, None])


def triton_rows(*args):
    """chunked_fwdbwd's row pass as one Triton kernel (prepo_kernels/triton/grpo_rows.py; imported
    on first use, as it imports triton)."""
    from .triton.grpo_rows import triton_rows as rows

    rows(*args)


def torch_fwdbwd(*args):
    """The contract above in plain PyTorch (any device): the chunk loop with torch's row pass."""
    return chunked_fwdbwd(torch_rows, *args)


def triton_fwdbwd(*args):
    """The contract above with the row pass in Triton (CUDA, or CPU under TRITON_INTERPRET=1); the
    three matmuls are torch's (cuBLAS on a GPU)."""
    return chunked_fwdbwd(triton_rows, *args)


def cpu_fwdbwd(hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, eps_low, eps_high,
               compute_entropy, need_grad):
    """The contract above in C++ (csrc/cpu/grpo_loss_cpu.cpp)."""
    return torch.ops.prepo_kernels.grpo_loss_fwdbwd(
        hidden, weight, bias, targets, inv_temp, old_logprob, advantages, scale, eps_low, eps_high,
        compute_entropy, need_grad, chunk_rows(weight.shape[0]), tile_rows(weight.shape[1]))


BACKENDS = {"torch": torch_fwdbwd, "cpu": cpu_fwdbwd, "triton": triton_fwdbwd}


def grpo_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when linear_grpo_loss can run backend ``name`` on ``device``, else why not: this loss
    lacks it ("cuda"), the extension lacks its op ("cpu"), or the registry's reason ("triton": no
    CUDA device and TRITON_INTERPRET unset, or triton not importable)."""
    if name not in BACKENDS:
        return f"no {name!r} backend for the fused GRPO loss (it has {sorted(BACKENDS)} and 'reference')"
    if name == "cpu" and not hasattr(torch.ops.prepo_kernels, OP.split("::")[1]):
        return ("the native extension was built without csrc/cpu/grpo_loss_cpu.cpp; rebuild it with "
                "`pip install --no-build-isolation -e .`")
    return registry.unavailable_reason(name, device)
