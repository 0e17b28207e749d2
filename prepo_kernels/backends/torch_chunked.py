"""Chunked pure-PyTorch backend: any device, no compiler.

Loops vocab tiles (outer) x row tiles (inner), so each [rows, vocab] logits tile lives only briefly
and each grad_weight tile is written once. Forward keeps per-row online statistics
(max m, sum of exp s, sum of exp * (z - m) t); backward recomputes each tile from lse.
"""
from __future__ import annotations

from typing import Optional

import torch

from .grpo_chunks import TORCH_CHUNKS
from .base import BackwardInputs, ForwardInputs, Grads, Stats, accumulation_dtype

# elements in one logits tile: 4M fp32 = 16 MB, a few tiles of temporaries stay well under 100 MB
TILE_ELEMENTS = 1 << 22
MAX_TILE_VOCAB = 8192


def _tiles(n: int, vocab: int) -> tuple[int, int]:
    """(rows per tile, vocab per tile)."""
    tile_v = min(vocab, MAX_TILE_VOCAB)
    tile_n = max(1, min(n, TILE_ELEMENTS // tile_v))
    return tile_n, tile_v


def _logits_tile(h, w_tile, b_tile, inv_temp):
    """z = (h @ w_tile.T + b_tile) * inv_temp[:, None], all in the accumulation dtype."""
    z = h @ w_tile.T
    if b_tile is not None:
        z += b_tile
    return z.mul_(inv_temp[:, None])


def tile_targets(targets, v0, v1):
    """(in_tile [n] bool, column index within the tile [n, 1])."""
    in_tile = (targets >= v0) & (targets < v1)
    return in_tile, torch.where(in_tile, targets - v0, 0)[:, None]


def merge_stats(m1, s1, t1, m2, s2, t2):
    """Merge two online-softmax partial statistics (max, sum exp(z-m), sum exp(z-m)(z-m)).
    A part with no finite logit has m = -inf and s = t = 0 and drops out without NaN."""
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isfinite(m), m, 0)
    out_s, out_t = torch.zeros_like(s1), torch.zeros_like(t1)
    for mi, si, ti in ((m1, s1, t1), (m2, s2, t2)):
        live = si > 0
        shift = torch.where(live, mi - m_safe, 0)
        a = torch.where(live, shift.exp(), 0)
        out_s += a * si
        out_t += a * (ti + shift * si)
    return m, out_s, out_t


def tile_stats(z):
    m = z.amax(dim=1)
    m_safe = torch.where(torch.isfinite(m), m, 0)
    d = z - m_safe[:, None]
    e = d.exp()
    return m, e.sum(1), torch.where(e > 0, e * d, 0).sum(1)


def forward(x: ForwardInputs) -> Stats:
    hidden, weight, bias, targets, inv_temp = x.hidden, x.weight, x.bias, x.targets, x.inv_temp
    acc = accumulation_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.to(acc)
    m = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
    s, t, z_target = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    tile_n, tile_v = _tiles(n, vocab)
    for v0 in range(0, vocab, tile_v):
        v1 = min(v0 + tile_v, vocab)
        w_tile = weight[v0:v1].to(acc)
        b_tile = None if bias is None else bias[v0:v1].to(acc)
        for r0 in range(0, n, tile_n):
            rows = slice(r0, min(r0 + tile_n, n))
            z = _logits_tile(h[rows], w_tile, b_tile, inv_temp[rows])
            in_tile, col = tile_targets(targets[rows], v0, v1)
            z_target[rows] = torch.where(in_tile, z.gather(1, col).squeeze(1), z_target[rows])
            m[rows], s[rows], t[rows] = merge_stats(m[rows], s[rows], t[rows], *tile_stats(z))
    lse = m + s.log()
    entropy = s.log() - t / s if x.params.compute_entropy else h.new_empty(0)
    return z_target - lse, entropy, lse


def grad_logits_tile(z, lse, entropy, g, e, in_tile, col):
    """dL/dz for one tile (before the inv_temp factor); -inf logits give exactly 0."""
    logp = z - lse[:, None]
    p = logp.exp()
    coeff = g[:, None] if e is None else g[:, None] + e[:, None] * (logp + entropy[:, None])
    dz = torch.where(p > 0, -p * coeff, 0)
    dz.scatter_add_(1, col, torch.where(in_tile, g, 0)[:, None])
    return dz


def backward(x: BackwardInputs) -> Grads:
    hidden, weight, bias, targets, inv_temp = x.hidden, x.weight, x.bias, x.targets, x.inv_temp
    g, e, lse, entropy = x.grad_logprob, x.grad_entropy, x.lse, x.entropy
    acc = accumulation_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.to(acc)
    grad_h = torch.zeros_like(h)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device)
    grad_b = None if bias is None else torch.zeros(vocab, dtype=acc, device=h.device)
    tile_n, tile_v = _tiles(n, vocab)
    for v0 in range(0, vocab, tile_v):
        v1 = min(v0 + tile_v, vocab)
        w_tile = weight[v0:v1].to(acc)
        b_tile = None if bias is None else bias[v0:v1].to(acc)
        for r0 in range(0, n, tile_n):
            rows = slice(r0, min(r0 + tile_n, n))
            z = _logits_tile(h[rows], w_tile, b_tile, inv_temp[rows])
            in_tile, col = tile_targets(targets[rows], v0, v1)
            e_rows = None if e is None else e[rows]
            dz = grad_logits_tile(z, lse[rows], entropy[rows], g[rows], e_rows, in_tile, col)
            dz.mul_(inv_temp[rows][:, None])
            grad_h[rows] += dz @ w_tile
            grad_w[v0:v1] += dz.T @ h[rows]
            if grad_b is not None:
                grad_b[v0:v1] += dz.sum(0)
    return grad_h, grad_w, grad_b


class TorchChunkedBackend:
    name = "torch"
    grpo_chunks = TORCH_CHUNKS  # the one-pass GRPO loss's row chunks in torch ops
    forward = staticmethod(forward)
    backward = staticmethod(backward)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None


BACKENDS = {"torch": TorchChunkedBackend()}
