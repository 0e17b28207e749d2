"""Backward, deterministic mode, part 2: grad_weight and grad_bias without atomics.

Grid over vocab tiles; each program walks all row blocks in order, recomputes z and dz for
(row block x its vocab tile) and adds dz.T @ h[rows] into its own rows of dW (plain
load/add/store) and sum_rows dz into a register accumulator for db. Same tiles (BLOCK_N, BLOCK_V)
as backward_dh.py, so both kernels make the same gradient-filter decisions.
"""
import triton
import triton.language as tl

from .tiles import dot, dz_tile, keep_tile, load_rows, logit_tile


@triton.jit
def _backward_dw_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, it_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr,
    dw_ptr, db_ptr,
    n, V, D, filter_budget,
    HAS_BIAS: tl.constexpr, HAS_E: tl.constexpr, FILTER: tl.constexpr,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    cols = offs_v.to(tl.int64) * D
    if IS_FP64:
        db = tl.zeros((BLOCK_V,), dtype=tl.float64)
    else:
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok, y, inv_t, lse, ent, g, e, thr = load_rows(
            y_ptr, it_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr, offs_n, n, filter_budget, HAS_E)
        z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, inv_t, n, V, D,
                       HAS_BIAS, IS_FP64, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        dz = dz_tile(z, offs_v, row_ok, y, lse, ent, g, e, inv_t, HAS_E)
        keep = True
        if FILTER:
            keep = keep_tile(dz, thr)
        if keep:
            db += tl.sum(dz, 0)
            dzc = dz.to(h_ptr.dtype.element_ty)
            rows = offs_n.to(tl.int64) * D
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                h = tl.load(h_ptr + rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                ptrs = dw_ptr + cols[:, None] + offs_d[None, :]
                msk = col_ok[:, None] & d_ok[None, :]
                cur = tl.load(ptrs, mask=msk, other=0.0)
                tl.store(ptrs, dot(tl.trans(dzc), h, cur, PRECISION, UPCAST), mask=msk)
    if HAS_BIAS:
        tl.store(db_ptr + offs_v, db, mask=col_ok)
