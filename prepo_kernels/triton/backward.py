"""Backward launcher: fast mode (backward_fused.py, atomics) or deterministic mode
(backward_dh.py + backward_dw.py, no atomics, bitwise reproducible)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..backends.base import BackwardInputs, Grads, accumulation_dtype
from . import config
from .backward_dh import _backward_dh_kernel
from .backward_dw import _backward_dw_kernel
from .backward_fused import _backward_fused_kernel


def triton_backward(x: BackwardInputs, blocks: Optional[config.Blocks] = None) -> Grads:
    """(grad_hidden [n, D], grad_weight [V, D], grad_bias [V] or None) in the accumulation dtype
    (backends/base.py); ``x.params`` picks the mode (deterministic) and the gradient filter, which
    only acts for bf16 / fp16 inputs (see config.filter_budget). ``blocks`` overrides the heuristic."""
    hidden, weight, bias, grad_entropy = x.hidden, x.weight, x.bias, x.grad_entropy
    deterministic = x.params.deterministic
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
    g = x.grad_logprob.to(acc_dtype).contiguous()
    e = grad_entropy.to(acc_dtype).contiguous() if has_e else g
    ent = x.entropy.to(acc_dtype).contiguous() if has_e else x.lse
    bl = blocks or config.backward_blocks(n, V, D, hidden.dtype, deterministic)
    budget = config.filter_budget(hidden.dtype, V, bl.BLOCK_V) if x.params.grad_filter else 0.0
    common = dict(
        HAS_BIAS=bias is not None, HAS_E=has_e, FILTER=budget > 0.0,
        IS_FP64=acc_dtype == torch.float64, PRECISION=config.input_precision(hidden.dtype),
        UPCAST=config.upcast_dots(hidden.dtype),
        BLOCK_N=bl.BLOCK_N, BLOCK_V=bl.BLOCK_V, BLOCK_D=bl.BLOCK_D,
        num_warps=bl.num_warps, num_stages=bl.num_stages,
    )
    args = (hidden, weight, bias if bias is not None else hidden, x.targets.contiguous(),
            x.inv_temp.to(acc_dtype).contiguous(), x.lse.contiguous(), ent, g, e)
    row_blocks, v_tiles = triton.cdiv(n, bl.BLOCK_N), triton.cdiv(V, bl.BLOCK_V)
    if deterministic:
        _backward_dh_kernel[(row_blocks,)](*args, dh, n, V, D, budget, **common)
        _backward_dw_kernel[(v_tiles,)](*args, dw, db if db is not None else dw, n, V, D, budget, **common)
    else:
        _backward_fused_kernel[(row_blocks * v_tiles,)](
            *args, dh, dw, db if db is not None else dw, n, V, D, budget, GROUP_N=8, **common)
    return dh, dw, db
