"""Log-prob and entropy for callers that already hold the logits, in row chunks.

The only full-size tensor created is the gradient w.r.t. the logits in backward (it is the
output); each chunk is upcast to the accumulation dtype on its own.
"""
from __future__ import annotations

import torch

from . import validation
from .backends import registry
from .backends.base import accumulation_dtype
from .backends.torch_chunked import TILE_ELEMENTS, grad_logits_tile, tile_stats, tile_targets
from .reference import reference_logprob_entropy


def _row_chunks(n: int, vocab: int):
    step = max(1, TILE_ELEMENTS // vocab)
    return [slice(r, min(r + step, n)) for r in range(0, n, step)]


class LogprobEntropyFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temp, valid):
        n, vocab = logits.shape
        acc = accumulation_dtype(logits.dtype)
        logprob, entropy, lse = (torch.zeros(n, dtype=acc, device=logits.device) for _ in range(3))
        for rows in _row_chunks(n, vocab):
            z = logits[rows].to(acc) * inv_temp[rows][:, None]
            m, s, t = tile_stats(z)
            lse[rows] = m + s.log()
            in_tile, col = tile_targets(targets[rows], 0, vocab)
            logprob[rows] = z.gather(1, col).squeeze(1) - lse[rows]
            entropy[rows] = s.log() - t / s
        zero = logprob.new_zeros(())
        logprob, entropy = torch.where(valid, logprob, zero), torch.where(valid, entropy, zero)
        ctx.save_for_backward(logits, targets, inv_temp, valid, lse, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, targets, inv_temp, valid, lse, entropy = ctx.saved_tensors
        n, vocab = logits.shape
        grad = torch.zeros_like(logits)
        g = torch.where(valid, grad_logprob, 0)
        e = torch.where(valid, grad_entropy, 0)
        for rows in _row_chunks(n, vocab):
            z = logits[rows].to(lse.dtype) * inv_temp[rows][:, None]
            in_tile, col = tile_targets(targets[rows], 0, vocab)
            dz = grad_logits_tile(z, lse[rows], entropy[rows], g[rows], e[rows], in_tile & valid[rows], col)
            grad[rows] = dz.mul_(inv_temp[rows][:, None])
        return grad, None, None, None


def logprob_entropy_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: validation.Temperature = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` and full-vocabulary entropy of softmax(logits / temperature).

    Args:
        logits: [..., V] float tensor (any float dtype; statistics accumulate in fp32, fp64 for fp64).
        targets: [...] int64 in [0, V) or ``ignore_index`` (those give 0 and no gradient).
        temperature: float > 0 or a tensor broadcastable to ``targets``.
        impl: any name :func:`linear_logprob_entropy` accepts, resolved by the same registry (so
            "auto", PREPO_KERNELS_IMPL and availability errors behave the same). "reference" is the
            whole-tensor oracle; every fused backend runs the row-chunked PyTorch path, the one
            from-logits implementation (the fused kernels start from hidden states, which a caller
            of this function does not have).
    Returns:
        (logprob, entropy) fp32 (fp64 for fp64 logits) with ``targets``' shape; differentiable w.r.t. logits.

    Compiles with ``torch.compile(fullgraph=True)``; what is checked while tracing and what at run
    time is as for :func:`prepo_kernels.linear_logprob_entropy`.
    """
    validation.check_tensor("logits", logits, floating=True)
    validation.check_tensor("targets", targets, integer=True)
    validation.check_same_device(logits=logits, targets=targets)
    backend = registry.resolve(impl, logits.device)
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits' leading dims {tuple(logits.shape[:-1])}"
        )
    if targets.numel() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"empty input: logits of shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    z = logits.reshape(-1, vocab)
    y = validation.checked_targets(targets.reshape(-1), vocab, ignore_index)
    valid = y != ignore_index
    inv_temp = validation.temperature_per_row(temperature, targets, accumulation_dtype(logits.dtype))
    if backend == "reference":
        logprob, entropy = reference_logprob_entropy(z.to(inv_temp.dtype) * inv_temp[:, None], y, valid)
    else:
        logprob, entropy = LogprobEntropyFromLogits.apply(z, torch.where(valid, y, 0), inv_temp, valid)
    return logprob.view(targets.shape), entropy.view(targets.shape)
