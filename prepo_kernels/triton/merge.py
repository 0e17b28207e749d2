"""Merge kernel: combine split-vocabulary partial forward statistics.

Split k of a row holds (m_k, s_k, t_k, zy_k) over its vocab slice, with
s_k = sum exp(z - m_k), t_k = sum exp(z - m_k) (z - m_k), zy_k = z_target if the target lies in the
slice else 0. Over all splits, with M = max_k m_k and a_k = exp(m_k - M):
    s = sum a_k s_k,  t = sum a_k (t_k + (m_k - M) s_k),  zy = sum zy_k
    lse = M + log s,  entropy = log s - t / s,  logprob = zy - lse.
Splits are combined in a fixed order (deterministic). Two passes: max first, then sums.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    pm_ptr, ps_ptr, pt_ptr, pzy_ptr, logprob_ptr, ent_ptr, lse_ptr, n, num_splits,
    COMPUTE_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    big_m = tl.load(pm_ptr + offs, mask=ok, other=float("-inf"))
    for k in range(1, num_splits):
        big_m = tl.maximum(big_m, tl.load(pm_ptr + k * n + offs, mask=ok, other=float("-inf")))
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    s = tl.zeros_like(big_m)
    t = tl.zeros_like(big_m)
    zy = tl.zeros_like(big_m)
    for k in range(0, num_splits):
        m_k = tl.load(pm_ptr + k * n + offs, mask=ok, other=float("-inf"))
        s_k = tl.load(ps_ptr + k * n + offs, mask=ok, other=0.0)
        a_k = tl.exp(m_k - m_safe)
        s += a_k * s_k
        zy += tl.load(pzy_ptr + k * n + offs, mask=ok, other=0.0)
        if COMPUTE_ENTROPY:
            t_k = tl.load(pt_ptr + k * n + offs, mask=ok, other=0.0)
            t += a_k * (t_k + tl.where(s_k > 0, (m_k - m_safe) * s_k, 0.0))
    log_s = tl.log(s)
    lse = big_m + log_s
    tl.store(lse_ptr + offs, lse, mask=ok)
    tl.store(logprob_ptr + offs, zy - lse, mask=ok)
    if COMPUTE_ENTROPY:
        tl.store(ent_ptr + offs, tl.where(s > 0, log_s - t / s, 0.0), mask=ok)


def merge_partials(
    pm: torch.Tensor, ps: torch.Tensor, pt: Optional[torch.Tensor], pzy: torch.Tensor,
    logprob: torch.Tensor, entropy: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Fill logprob / entropy / lse in place from [splits, n] partials (pt None: no entropy)."""
    splits, n = pm.shape
    block = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    compute_entropy = pt is not None
    _merge_kernel[(triton.cdiv(n, block),)](
        pm, ps, pt if compute_entropy else pm, pzy, logprob, entropy if compute_entropy else lse, lse,
        n, splits, COMPUTE_ENTROPY=compute_entropy, BLOCK=block,
    )
