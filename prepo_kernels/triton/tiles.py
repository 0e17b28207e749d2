"""@triton.jit helpers shared by the forward and backward kernels (no kernel launches here).

logit_tile: z[BLOCK_N, BLOCK_V] = (h[rows] @ W[cols].T + b[cols]) * inv_temp[rows], accumulated in
    fp32 (fp64 for fp64 inputs) over BLOCK_D chunks with tl.dot; vocab columns >= V are -inf.
dz_tile: dz = (g (1[v=y] - p) - e p (z - lse + H)) * inv_temp, with p = exp(z - lse); entries with
    z = -inf give exactly 0 (never 0 * inf); rows outside [0, n) give 0.
"""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with acc's dtype. UPCAST (set under the interpreter for 16-bit inputs, whose
    tl.dot mis-handles bf16 operands) converts the operands to acc's dtype first; 16-bit products
    are exact in fp32, so this is the same arithmetic a tensor core does."""
    if UPCAST:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, inv_t, n, V, D,
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if IS_FP64:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_ok = offs_n < n
    col_ok = offs_v < V
    rows = offs_n.to(tl.int64) * D
    cols = offs_v.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        h = tl.load(h_ptr + rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = dot(h, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(acc.dtype)
        acc = acc + b[None, :]
    z = acc * inv_t[:, None]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def load_rows(y_ptr, it_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr, offs_n, n, filter_budget, HAS_E: tl.constexpr):
    """Backward's per-row inputs for rows ``offs_n``: (row_ok, y, inv_t, lse, ent, g, e, thr). Rows
    >= n load neutral values; without entropy gradients e and ent are placeholders (unused by
    dz_tile). thr is the gradient-filter threshold of each row (see config.filter_budget)."""
    row_ok = offs_n < n
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    inv_t = tl.load(it_ptr + offs_n, mask=row_ok, other=1.0)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=float("inf"))
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0).to(inv_t.dtype)
    if HAS_E:
        e = tl.load(e_ptr + offs_n, mask=row_ok, other=0.0).to(inv_t.dtype)
        ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
        thr = filter_budget * (tl.abs(g) + tl.abs(e)) * inv_t
    else:
        e = g
        ent = lse
        thr = filter_budget * tl.abs(g) * inv_t
    return row_ok, y, inv_t, lse, ent, g, e, thr


@triton.jit
def dz_tile(z, offs_v, row_ok, y, lse, ent, g, e, inv_t, HAS_E: tl.constexpr):
    zc = z - lse[:, None]
    p = tl.exp(zc)
    onehot = offs_v[None, :] == y[:, None]
    dz = g[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_E:
        dz = dz - e[:, None] * tl.where(p > 0, p * (zc + ent[:, None]), 0.0)
    dz = dz * inv_t[:, None]
    return tl.where(row_ok[:, None], dz, 0.0)


@triton.jit
def keep_tile(dz, thr):
    """False (skip the tile) when every row's L1 mass of this dz tile is within its filter
    threshold ``thr`` [BLOCK_N] (see config.filter_budget)."""
    excess = tl.sum(tl.abs(dz), 1) - thr
    return tl.max(excess, 0) > 0
