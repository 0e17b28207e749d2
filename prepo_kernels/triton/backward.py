"""Backward launcher: fast mode (backward_fused.py, atomics) or deterministic mode
(backward_dh.py + backward_dw.py, no atomics, bitwise reproducible)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..backends.base import accumulation_dtype
from . import config
from .backward_dh import _backward_dh_kernel
from .backward_dw import _backward_dw_kernel
from .backward_fused import _backward_fused_kernel


def triton_backward(
    grad_logprob: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    deterministic: bool = False,
    grad_filter: bool = True,
    blocks: Optional[config.Blocks] = None,
):
    """(grad_hidden [n, D], grad_weight [V, D], grad_bias [V] or None) in the accumulation dtype.

    ``grad_filter`` only acts for bf16 / fp16 inputs (see config.filter_budget)."""
    n, D = hidden.shape
    V = weight.shape[0]
    acc_dtype = accumulation_dtype(hidden.dtype)
    dev = hidden.device
    dh = torch.zeros(n, D, dtype=acc_dtype, device=dev)
    dw = torch.zeros(V, D, dtype=acc_dtype, device=dev)
    db = torch.zeros(V, dtype=acc_dtype, device=dev) if bias is not None else None
    if n == 0:
        return dh, dw, db
    hidden, weight = hidden.contiguous(), weight.contiguous()
    has_e = grad_entropy is not None
    g = grad_logprob.to(acc_dtype).contiguous()
    e = grad_entropy.to(acc_dtype).contiguous() if has_e else g
    ent = entropy.to(acc_dtype).contiguous() if has_e else lse
    bl = blocks or config.backward_blocks(n, V, D, hidden.dtype, deterministic)
    budget = config.filter_budget(hidden.dtype, V, bl.BLOCK_V) if grad_filter else 0.0
    common = dict(
        HAS_BIAS=bias is not None, HAS_E=has_e, FILTER=budget > 0.0,
        IS_FP64=acc_dtype == torch.float64, PRECISION=config.input_precision(hidden.dtype),
        UPCAST=config.upcast_dots(hidden.dtype),
        BLOCK_N=bl.BLOCK_N, BLOCK_V=bl.BLOCK_V, BLOCK_D=bl.BLOCK_D,
        num_warps=bl.num_warps, num_stages=bl.num_stages,
    )
    args = (hidden, weight, bias if bias is not None else hidden, targets.contiguous(),
            inv_temp.to(acc_dtype).contiguous(), lse.contiguous(), ent, g, e)
    row_blocks, v_tiles = triton.cdiv(n, bl.BLOCK_N), triton.cdiv(V, bl.BLOCK_V)
    if deterministic:
        _backward_dh_kernel[(row_blocks,)](*args, dh, n, V, D, budget, **common)
        _backward_dw_kernel[(v_tiles,)](*args, dw, db if db is not None else dw, n, V, D, budget, **common)
    else:
        _backward_fused_kernel[(row_blocks * v_tiles,)](
            *args, dh, dw, db if db is not None else dw, n, V, D, budget, GROUP_N=8, **common)
    return dh, dw, db
