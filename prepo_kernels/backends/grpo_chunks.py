"""The one-pass row chunks of :func:`prepo_kernels.linear_grpo_loss` (``Backend.grpo_chunks``).

A backend's ``grpo_chunks`` (None where it has none: "cuda", whose GRPO loss runs in two passes)
holds one chunk of dense rows (no ignored targets) at a time, in two calls around the objective's
per-token gradient:

    forward(hidden [c, D], weight [V, D], bias [V] or None, targets [c] int64 in [0, V),
            inv_temp [c] (accumulation dtype), compute_entropy)
        -> (logprob [c], entropy [c] or [0], state)     matmul 1; the chunk's logits live in state
    backward(state, g [c], e [c] or None, grad_hidden [c, D] (accumulation dtype, written),
             grad_weight [V, D] (the weight's dtype, added to), grad_bias [V] or [0] (accumulation dtype,
             added to))                                    dz in place of the logits; matmuls 2 and 3

with g = dL/dlogprob, e = dL/dentropy and, z = (h W^T + b) * inv_temp, p = softmax(z), H the entropy,

    dL/dz_v = g (1[v = y] - p_v) - e p_v (z_v - lse + H),   grad_hidden = (dL/dz inv_temp) W,
    grad_weight += (dL/dz inv_temp)^T h,                      grad_bias += column sums.

"torch" and "triton" share the chunk's matmuls (torch's: cuBLAS on a GPU, in the inputs' dtype as the
reference's logits) and differ in the row pass (torch ops, or the Triton kernels of
prepo_kernels/triton/grpo_rows.py); "cpu" is csrc/cpu/grpo_loss_cpu.cpp (vocab-major logits; bf16 GEMMs
with fp32 logits where the CPU has native bf16 dot products, AVX512_BF16 or AMX, else bf16 / fp16 GEMMs
in fp32 tiles; ``PREPO_CPU_BF16_BRGEMM=0`` forces the latter).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .base import accumulation_dtype

# bytes of one chunk's fp32 logits (rows x V): the chunk's rows are max(16, min(1024, this / 4V)).
# Larger chunks mean fewer read-modify-writes of the [V, D] dW (faster), and more memory.
CHUNK_BYTES = 32 << 20
# bytes of one fp32 tile of W (and one of dW) that the C++ chunks upcast at a time for bf16 / fp16
# weights on the fp32-tile path (1024-row tiles took 1.56x the time of 4096-row ones at N, D, V = 1024, 512, 8192 bf16).
TILE_BYTES = 8 << 20


def chunk_rows(vocab: int) -> int:
    return max(16, min(1024, CHUNK_BYTES // (4 * vocab)))


def tile_rows(dim: int) -> int:
    return max(16, TILE_BYTES // (4 * dim))


TokenGrads = Callable[[Tensor, slice], "tuple[Tensor, Optional[Tensor]]"]


@torch.no_grad()  # the gradients are computed here, not recorded (token_grads enables grad for its own vectors)
def one_pass_fwdbwd(chunks, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    inv_temp: Tensor, token_grads: TokenGrads, need_grad: bool, compute_entropy: bool):
    """Every row chunk through ``chunks``: (logprob [n], entropy [n] or [0], (grad_hidden [n, D] acc,
    grad_weight [V, D] weight dtype, grad_bias [V] acc or [0]) or None). ``token_grads(logprob_chunk,
    rows)`` gives the chunk's (g, e)."""
    acc = accumulation_dtype(hidden.dtype)
    n, D, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    logprob = hidden.new_zeros((n,), dtype=acc)
    entropy = hidden.new_zeros((n if compute_entropy else 0,), dtype=acc)
    grads = None
    if need_grad:
        grads = (hidden.new_zeros((n, D), dtype=acc), torch.zeros_like(weight),
                 weight.new_zeros((V if bias is not None else 0,), dtype=acc))
    step = chunk_rows(V)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        lp, ent, state = chunks.forward(hidden[rows].contiguous(), weight, bias, targets[rows], inv_temp[rows],
                                        compute_entropy)
        logprob[rows] = lp
        if compute_entropy:
            entropy[rows] = ent
        if need_grad:
            g, e = token_grads(lp, rows)
            chunks.backward(state, g, e, grads[0][rows], grads[1], grads[2])
        del state  # the chunk's logits go before the next chunk's are allocated
    return logprob, entropy, grads


def torch_stats(z: Tensor, targets: Tensor, inv_temp: Tensor, compute_entropy: bool):
    """The row pass's first half in torch ops: z [c, V] <- z * inv_temp in place; (logprob, entropy
    or [0], lse), each [c]."""
    z.mul_(inv_temp[:, None])
    lse = torch.logsumexp(z, dim=1)
    logprob = z.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = z.new_zeros(0)
    if compute_entropy:
        p = torch.exp(z - lse[:, None])
        entropy = lse - torch.where(p > 0, p * z, 0).sum(1)  # -inf logits: p = 0, no NaN
    return logprob, entropy, lse


def torch_grad(z: Tensor, targets: Tensor, inv_temp: Tensor, lse: Tensor, entropy: Tensor, g: Tensor,
               e: Optional[Tensor]) -> None:
    """The row pass's second half: z (scaled logits) <- dL/dz * inv_temp in place."""
    logp = z.sub_(lse[:, None])
    p = torch.exp(logp)
    coeff = g[:, None] if e is None else g[:, None] + e[:, None] * torch.where(p > 0, logp + entropy[:, None], 0)
    z.copy_(torch.where(p > 0, -p * coeff, 0)).scatter_add_(1, targets[:, None], g[:, None])
    z.mul_(inv_temp[:, None])


class MatmulChunks:
    """Chunks whose three matmuls are torch's, with the row pass ``stats`` / ``grad`` (torch or Triton)."""

    def __init__(self, stats, grad):
        self.stats, self.grad = stats, grad

    def forward(self, hidden, weight, bias, targets, inv_temp, compute_entropy):
        z = hidden @ weight.T
        if bias is not None:
            z += bias
        z = z.to(accumulation_dtype(hidden.dtype))
        logprob, entropy, lse = self.stats(z, targets, inv_temp, compute_entropy)
        return logprob, entropy, (z, hidden, weight, targets, inv_temp, lse, entropy)

    def backward(self, state, g, e, grad_hidden, grad_weight, grad_bias):
        z, hidden, weight, targets, inv_temp, lse, entropy = state
        self.grad(z, targets, inv_temp, lse, entropy, g, e)
        if grad_bias.numel():
            grad_bias += z.sum(0)
        dz = z.to(hidden.dtype)
        grad_hidden.copy_(dz @ weight)
        grad_weight.addmm_(dz.T, hidden)


class CppChunks:
    """The chunks of csrc/cpu/grpo_loss_cpu.cpp (``prepo_kernels::grpo_chunk_forward`` /
    ``grpo_chunk_backward``): the logits vocab-major in a reused [chunk rows x V] buffer."""

    def forward(self, hidden, weight, bias, targets, inv_temp, compute_entropy):
        acc = accumulation_dtype(hidden.dtype)
        zbuf = hidden.new_empty((hidden.shape[0] * weight.shape[0],), dtype=acc)
        tiles = tile_rows(weight.shape[1])
        logprob, entropy, lse = torch.ops.prepo_kernels.grpo_chunk_forward(
            hidden, weight, bias, targets, inv_temp, compute_entropy, tiles, zbuf)
        return logprob, entropy, (zbuf, hidden, weight, targets, inv_temp, lse, entropy, tiles)

    def backward(self, state, g, e, grad_hidden, grad_weight, grad_bias):
        zbuf, hidden, weight, targets, inv_temp, lse, entropy, tiles = state
        torch.ops.prepo_kernels.grpo_chunk_backward(
            zbuf, hidden, weight, targets, inv_temp, lse, entropy, g, e, tiles, grad_hidden, grad_weight, grad_bias)


TORCH_CHUNKS = MatmulChunks(torch_stats, torch_grad)
