"""The one-pass GRPO loss's row pass on a row chunk's logits (the "triton" chunks of
prepo_kernels/backends/grpo_chunks.py, whose torch matmuls compute the logits before and consume
dL/dz after these kernels): one program per row, streaming over V in BLOCK_V tiles.

_grpo_stats_kernel, row i of z [c, V] (fp32, fp64 for fp64 inputs; bias added): x = z * inv_temp,
    written back in place; m = running max, s = sum exp(x - m), t = sum exp(x - m) (x - m) (the
    entropy's sum; m starts at -inf and each rescale guards -inf - -inf and 0 * -inf, as forward.py
    does); lse = m + log s, logprob = x[y] - lse, entropy = log s - t / s.
_grpo_grad_kernel, given g = dL/dlogprob and e = dL/dentropy (HAS_E) of the row:
    z[i] <- (g (1[v = y] - p_v) - e p_v (x_v - lse + H)) * inv_temp, p = exp(x - lse), in place.
A -inf logit (a -inf bias masks that entry) gives p = 0 exactly, never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config


@triton.jit
def _grpo_stats_kernel(z_ptr, y_ptr, it_ptr, logprob_ptr, ent_ptr, lse_ptr, V,
                       COMPUTE_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * V
    y = tl.load(y_ptr + row)
    inv_t = tl.load(it_ptr + row)
    zero = inv_t * 0.0  # a scalar of the row's dtype (fp32 or fp64)
    m = zero + float("-inf")
    s = zero
    t = zero
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = tl.load(z_row + offs, mask=ok, other=float("-inf")) * inv_t
        tl.store(z_row + offs, x, mask=ok)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # 0 while m == -inf
        xc = x - m_safe
        p = tl.exp(xc)  # 0 where x == -inf
        if COMPUTE_ENTROPY:  # t rescaled to the new max: alpha (t + (m - m_new) s)
            t = alpha * (t + tl.where(s > 0, (m - m_safe) * s, 0.0))
            t += tl.sum(tl.where(p > 0, p * xc, 0.0), 0)
        s = s * alpha + tl.sum(p, 0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)
    tl.store(logprob_ptr + row, tl.load(z_row + y) - lse)
    if COMPUTE_ENTROPY:
        tl.store(ent_ptr + row, tl.where(s > 0, log_s - t / s, 0.0))


@triton.jit
def _grpo_grad_kernel(z_ptr, y_ptr, it_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr, V,
                      HAS_E: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * V
    y = tl.load(y_ptr + row)
    inv_t = tl.load(it_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        logp = tl.load(z_row + offs, mask=ok, other=float("-inf")) - lse
        p = tl.exp(logp)
        coeff = g
        if HAS_E:
            coeff = g + tl.load(e_ptr + row) * tl.where(p > 0, logp + tl.load(ent_ptr + row), 0.0)
        dz = (tl.where(offs == y, g, 0.0) - tl.where(p > 0, p * coeff, 0.0)) * inv_t
        tl.store(z_row + offs, dz, mask=ok)


def triton_stats(z: torch.Tensor, targets: torch.Tensor, inv_temp: torch.Tensor, compute_entropy: bool):
    """grpo_chunks.torch_stats as one kernel: z [c, V] contiguous, fp32 or fp64 (as inv_temp [c]);
    targets [c] int64 in [0, V). Scales z in place; returns (logprob, entropy or [0], lse)."""
    c, V = z.shape
    logprob, lse = z.new_empty(c), z.new_empty(c)
    entropy = z.new_empty(c if compute_entropy else 0)
    if c:
        block_v, num_warps = config.grpo_rows_blocks(V, z.dtype)
        _grpo_stats_kernel[(c,)](z, targets.contiguous(), inv_temp.contiguous(), logprob,
                                 entropy if compute_entropy else logprob, lse, V,
                                 COMPUTE_ENTROPY=compute_entropy, BLOCK_V=block_v, num_warps=num_warps)
    return logprob, entropy, lse


def triton_grad(z: torch.Tensor, targets: torch.Tensor, inv_temp: torch.Tensor, lse: torch.Tensor,
                entropy: torch.Tensor, g: torch.Tensor, e: Optional[torch.Tensor]) -> None:
    """grpo_chunks.torch_grad as one kernel: z (scaled logits) <- dL/dz * inv_temp in place."""
    c, V = z.shape
    if c == 0:
        return
    block_v, num_warps = config.grpo_rows_blocks(V, z.dtype)
    g = g.to(z.dtype).contiguous()
    e = g if e is None else e.to(z.dtype).contiguous()
    _grpo_grad_kernel[(c,)](z, targets.contiguous(), inv_temp.contiguous(), lse, entropy if entropy.numel() else lse,
                            g, e, V, HAS_E=e is not g, BLOCK_V=block_v, num_warps=num_warps)
