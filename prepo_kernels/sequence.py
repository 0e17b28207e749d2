"""Per-sequence reductions of per-token values: padded [B, T] with a mask, or packed [total] with cu_seqlens.

A sequence with no valid token has mean 0 (so perplexity 1.0): it contributes nothing and never
turns a batch statistic into NaN. Use the mask's row sums to find such sequences.

Both functions compile with ``torch.compile(fullgraph=True)``: shapes and dtypes are checked while
tracing; the checks on values (a non-bool mask holds only 0/1, cu_seqlens are valid offsets) are
custom ops, so they raise the same ValueError in a compiled graph as in eager mode.
"""
from __future__ import annotations

from typing import Optional

import torch

from .validation import check_same_device, check_tensor


@torch.library.custom_op("prepo_kernels::checked_mask", mutates_args=())
def checked_mask(mask: torch.Tensor) -> torch.Tensor:
    """mask of any dtype -> bool, after checking that it holds only 0 and 1 (ValueError otherwise)."""
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must be boolean or hold only 0 and 1")
    return mask.to(torch.bool, copy=True)


@checked_mask.register_fake
def _checked_mask_fake(mask):
    return torch.empty_like(mask, dtype=torch.bool)


@torch.library.custom_op("prepo_kernels::segment_ids", mutates_args=())
def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens [B+1] -> the sequence index [total] int64 of each packed token, after checking that
    the offsets start at 0, never decrease and end at ``total`` (ValueError otherwise)."""
    lengths = cu_seqlens.diff()
    if int(cu_seqlens[0]) != 0 or bool((lengths < 0).any()) or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at values.numel()={total}, "
            f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'a tensor that does not'}"
        )
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


@segment_ids.register_fake
def _segment_ids_fake(cu_seqlens, total):
    return cu_seqlens.new_empty((total,), dtype=torch.int64)


def _check_mask(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    check_tensor("mask", mask)
    check_same_device(values=values, mask=mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")
    return checked_mask(mask)


def _segments(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence index [total] of each packed token, after checking cu_seqlens."""
    check_tensor("cu_seqlens", cu_seqlens, integer=True)
    check_same_device(values=values, cu_seqlens=cu_seqlens)
    if values.dim() != 1:
        raise ValueError(f"packed values must be 1-D [total], got shape {tuple(values.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    return segment_ids(cu_seqlens, values.numel())


def sequence_mean(
    values: torch.Tensor, mask: Optional[torch.Tensor] = None, *, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean of ``values`` over each sequence's valid tokens.

    Args:
        values: padded [B, T] or, with ``cu_seqlens``, packed [total]; float.
        mask: same shape as values, bool or 0/1; None means every token is valid.
        cu_seqlens: [B+1] int offsets of the packed sequences (0, ..., total).
    Returns:
        [B] in values' dtype; 0 for a sequence with no valid token. Differentiable w.r.t. values.
    """
    check_tensor("values", values, floating=True)
    valid = _check_mask(values, mask)
    # summed in fp32 (fp64 for fp64): index_add in bf16 rounds after every token
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    masked = torch.where(valid, values, 0).to(acc)
    if cu_seqlens is None:
        if values.dim() != 2:
            raise ValueError(
                f"padded values must be 2-D [B, T] (pass cu_seqlens for packed 1-D values), got {tuple(values.shape)}"
            )
        total, count = masked.sum(-1), valid.sum(-1)
    else:
        seg = _segments(values, cu_seqlens)
        batch = cu_seqlens.numel() - 1
        total = masked.new_zeros(batch).index_add(0, seg, masked)
        count = torch.zeros(batch, dtype=torch.long, device=values.device).index_add_(0, seg, valid.long())
    return (total / count.clamp(min=1).to(acc)).to(values.dtype)


def sequence_perplexity(
    logprob: torch.Tensor, mask: Optional[torch.Tensor] = None, *, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """exp(-mean log-prob) per sequence; same layouts as :func:`sequence_mean`; 1.0 for an empty sequence."""
    return torch.exp(-sequence_mean(logprob, mask, cu_seqlens=cu_seqlens))
