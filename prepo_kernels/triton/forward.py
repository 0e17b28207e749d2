"""Forward kernel + launcher: per-row logprob of the target, full-vocabulary entropy, lse.

Each program owns BLOCK_N rows and one contiguous slice of the vocabulary (a "split"); it walks
that slice BLOCK_V columns at a time, keeping per row
    m = running max of z,  s = sum exp(z - m),  t = sum exp(z - m) * (z - m),  zy = z[target]
(m starts at -inf; rescaling guards every -inf - -inf and 0 * -inf). Then
    lse = m + log s,   entropy = log s - t / s,   logprob = zy - lse.
With one split the kernel writes those directly; with several it writes the partial (m, s, t, zy)
and ``merge.py`` combines them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends.base import ForwardInputs, Stats, accumulation_dtype
from . import config
from .merge import merge_partials
from .tiles import logit_tile


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, it_ptr,
    logprob_ptr, ent_ptr, lse_ptr,
    pm_ptr, ps_ptr, pt_ptr, pzy_ptr,
    n, V, D, v_per_split,
    HAS_BIAS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    inv_t = tl.load(it_ptr + offs_n, mask=row_ok, other=1.0)
    if IS_FP64:
        zero = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m = zero + float("-inf")
    s = zero
    t = zero
    zy = zero

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, inv_t, n, V, D,
                       HAS_BIAS, IS_FP64, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # 0 while m == -inf
        zc = z - m_safe[:, None]
        p = tl.exp(zc)  # 0 where z == -inf
        if COMPUTE_ENTROPY:
            # rescale t to the new max: sum p' (zc' ) = alpha * (t + (m - m_new) * s)
            t = alpha * (t + tl.where(s > 0, (m - m_safe) * s, 0.0))
            t += tl.sum(tl.where(p > 0, p * zc, 0.0), 1)
        s = s * alpha + tl.sum(p, 1)
        m = m_new

    if SPLIT:
        out = pid_s * n + offs_n
        tl.store(pm_ptr + out, m, mask=row_ok)
        tl.store(ps_ptr + out, s, mask=row_ok)
        tl.store(pzy_ptr + out, zy, mask=row_ok)
        if COMPUTE_ENTROPY:
            tl.store(pt_ptr + out, t, mask=row_ok)
    else:
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(lse_ptr + offs_n, lse, mask=row_ok)
        tl.store(logprob_ptr + offs_n, zy - lse, mask=row_ok)
        if COMPUTE_ENTROPY:
            ent = tl.where(s > 0, log_s - t / s, 0.0)
            tl.store(ent_ptr + offs_n, ent, mask=row_ok)


def triton_forward(
    x: ForwardInputs, num_splits: Optional[int] = None, blocks: Optional[config.Blocks] = None
) -> Stats:
    """(logprob [n], entropy [n] or empty, lse [n]) in the accumulation dtype (backends/base.py).

    ``num_splits`` / ``blocks`` override the heuristics (tests use them to force the merge path)."""
    hidden, weight, bias, compute_entropy = x.hidden, x.weight, x.bias, x.params.compute_entropy
    n, D = hidden.shape
    V = weight.shape[0]
    acc_dtype = accumulation_dtype(hidden.dtype)
    dev = hidden.device
    logprob = torch.empty(n, dtype=acc_dtype, device=dev)
    lse = torch.empty(n, dtype=acc_dtype, device=dev)
    entropy = torch.empty(n if compute_entropy else 0, dtype=acc_dtype, device=dev)
    if n == 0:
        return logprob, entropy, lse
    hidden, weight = hidden.contiguous(), weight.contiguous()
    targets = x.targets.contiguous()
    inv_temp = x.inv_temp.to(acc_dtype).contiguous()
    bl = blocks or config.forward_blocks(n, V, D, hidden.dtype)
    v_tiles = triton.cdiv(V, bl.BLOCK_V)
    splits = num_splits or config.forward_splits(n, V, bl, dev)
    splits = max(1, min(int(splits), v_tiles))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    v_per_split = tiles_per_split * bl.BLOCK_V
    split = splits > 1
    if split:
        pm = torch.empty(splits, n, dtype=acc_dtype, device=dev)
        ps, pzy = torch.empty_like(pm), torch.empty_like(pm)
        pt = torch.empty_like(pm) if compute_entropy else pm
    else:
        pm = ps = pt = pzy = lse  # unused
    grid = (triton.cdiv(n, bl.BLOCK_N), splits)
    _forward_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, inv_temp,
        logprob, entropy if compute_entropy else lse, lse,
        pm, ps, pt, pzy,
        n, V, D, v_per_split,
        HAS_BIAS=bias is not None, COMPUTE_ENTROPY=compute_entropy, SPLIT=split,
        IS_FP64=acc_dtype == torch.float64, PRECISION=config.input_precision(hidden.dtype),
        UPCAST=config.upcast_dots(hidden.dtype),
        BLOCK_N=bl.BLOCK_N, BLOCK_V=bl.BLOCK_V, BLOCK_D=bl.BLOCK_D,
        num_warps=bl.num_warps, num_stages=bl.num_stages,
    )
    if split:
        merge_partials(pm, ps, pt if compute_entropy else None, pzy, logprob, entropy, lse)
    return logprob, entropy, lse
