"""Backward, fast mode: one kernel over (row block, vocab tile) pairs, atomics into the outputs.

Each program recomputes its logit tile z[BLOCK_N, BLOCK_V], forms dz in registers, then for each
BLOCK_D chunk adds dz @ W[tile] into dh[rows] and dz.T @ h[rows] into dW[tile] with tl.atomic_add
(fp32 / fp64 buffers), and sum_rows dz into db. Three GEMM-sized passes (z, dh, dW) in total;
the order of the atomic additions varies run to run, so results are not bitwise reproducible
(use the deterministic kernels in backward_dh.py / backward_dw.py for that).
For 16-bit inputs dz is rounded to the input dtype before the two gradient dots (tensor-core
inputs); accumulation stays fp32.
"""
import triton
import triton.language as tl

from .tiles import dot, dz_tile, keep_tile, load_rows, logit_tile


@triton.jit
def _backward_fused_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, it_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr,
    dh_ptr, dw_ptr, db_ptr,
    n, V, D, filter_budget,
    HAS_BIAS: tl.constexpr, HAS_E: tl.constexpr, FILTER: tl.constexpr,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grouped ordering: GROUP_N row blocks sweep the vocab together, so W tiles are reused from L2
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    group = GROUP_N * num_pid_v
    first_n = (pid // group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % group) % group_size
    pid_v = (pid % group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    row_ok, y, inv_t, lse, ent, g, e, thr = load_rows(
        y_ptr, it_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr, offs_n, n, filter_budget, HAS_E)

    z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, inv_t, n, V, D,
                   HAS_BIAS, IS_FP64, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
    dz = dz_tile(z, offs_v, row_ok, y, lse, ent, g, e, inv_t, HAS_E)
    keep = True
    if FILTER:
        keep = keep_tile(dz, thr)
    if keep:
        if HAS_BIAS:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, 0), mask=col_ok, sem="relaxed")
        dzc = dz.to(h_ptr.dtype.element_ty)
        rows = offs_n.to(tl.int64) * D
        cols = offs_v.to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            w = tl.load(w_ptr + cols[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            h = tl.load(h_ptr + rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            dh = dot(dzc, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=dz.dtype), PRECISION, UPCAST)
            tl.atomic_add(dh_ptr + rows[:, None] + offs_d[None, :], dh,
                          mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            dw = dot(tl.trans(dzc), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=dz.dtype), PRECISION, UPCAST)
            tl.atomic_add(dw_ptr + cols[:, None] + offs_d[None, :], dw,
                          mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
