"""The fused GRPO loss's row pass (the "triton" backend of prepo_kernels.linear_grpo_loss): one
program per row of a row chunk's logits, which prepo_kernels/grpo_backends.py's chunk loop computes
with torch matmuls before and consumes after this kernel.

For row i of z [c, V] (fp32, fp64 for fp64 inputs; bias added, not yet scaled by inv_temp):
    pass 1, over V in BLOCK_V tiles, on x = z * inv_temp: m = running max, s = sum exp(x - m),
        t = sum exp(x - m) (x - m) (the entropy's sum; m starts at -inf and each rescale guards
        -inf - -inf and 0 * -inf, as forward.py does);
        lse = m + log s,  logprob = x[y] - lse,  entropy = log s - t / s;
    the surrogate's gradient, as grpo_backends.surrogate_grad and csrc's Surrogate::grad:
        r = exp(logprob - old) (exactly 1 without old log-probs: on-policy),
        g = -scale * A * r, or 0 where clip(r, 1 - eps_low, 1 + eps_high) A < r A;
    pass 2 (NEED_GRAD), over V again: z[i] <- g (1[v = y] - p_v) * inv_temp with p = exp(x - lse),
        in place. A -inf logit (a -inf bias masks that entry) gives p = 0 exactly, never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config


@triton.jit
def _grpo_rows_kernel(
    z_ptr, y_ptr, it_ptr, old_ptr, adv_ptr, consts_ptr, logprob_ptr, ent_ptr, V,
    HAS_OLD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
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
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")) * inv_t
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
    logprob = tl.load(z_row + y) * inv_t - lse
    tl.store(logprob_ptr + row, logprob)
    if COMPUTE_ENTROPY:
        tl.store(ent_ptr + row, tl.where(s > 0, log_s - t / s, 0.0))
    if NEED_GRAD:
        scale = tl.load(consts_ptr)
        lo = tl.load(consts_ptr + 1)
        hi = tl.load(consts_ptr + 2)
        adv = tl.load(adv_ptr + row)
        if HAS_OLD:
            ratio = tl.exp(logprob - tl.load(old_ptr + row))
        else:
            ratio = zero + 1.0
        clipped = tl.minimum(tl.maximum(ratio, lo), hi) * adv < ratio * adv
        g = tl.where(clipped, 0.0, -scale * adv * ratio)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            ok = offs < V
            x = tl.load(z_row + offs, mask=ok, other=float("-inf")) * inv_t
            p = tl.exp(x - lse)
            dz = (tl.where(offs == y, g, 0.0) - g * p) * inv_t
            tl.store(z_row + offs, dz, mask=ok)


def triton_rows(z: torch.Tensor, targets: torch.Tensor, inv_temp: torch.Tensor, old_logprob: Optional[torch.Tensor],
                advantages: torch.Tensor, logprob: torch.Tensor, entropy: Optional[torch.Tensor], scale: float,
                eps_low: float, eps_high: float, need_grad: bool) -> None:
    """The row pass of grpo_backends.chunked_fwdbwd: z [c, V] contiguous, fp32 or fp64 (the
    accumulation dtype, as are inv_temp / old_logprob (None: on-policy) / advantages [c], and the
    outputs logprob [c] and entropy [c] or None); targets [c] int64 in [0, V). Writes logprob (nats)
    and entropy, and with ``need_grad`` overwrites z with dL/dz * inv_temp."""
    c, V = z.shape
    if c == 0:
        return
    # scale and the clip bounds in z's dtype (a float argument would reach the kernel as fp32)
    consts = torch.tensor([scale, 1 - eps_low, 1 + eps_high], dtype=z.dtype, device=z.device)
    block_v, num_warps = config.grpo_rows_blocks(V, z.dtype)
    # a broadcast advantage reaches here with stride 0; the kernel indexes every row input by row
    targets, inv_temp, advantages = (t.contiguous() for t in (targets, inv_temp, advantages))
    old = advantages if old_logprob is None else old_logprob.contiguous()
    _grpo_rows_kernel[(c,)](
        z, targets, inv_temp, old, advantages, consts,
        logprob, logprob if entropy is None else entropy, V,
        HAS_OLD=old_logprob is not None, COMPUTE_ENTROPY=entropy is not None, NEED_GRAD=need_grad,
        BLOCK_V=block_v, num_warps=num_warps,
    )
