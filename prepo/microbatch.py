"""Micro-batches by a token budget: every forward (scoring, old log-probs, update) holds at most
``max_tokens`` padded tokens, so peak activation memory is set by an option, not by the batch."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def token_chunks(rows: torch.Tensor, width: int, max_tokens: int) -> list[torch.Tensor]:
    """Split the row indices ``rows`` [N] of a batch padded to ``width`` tokens into consecutive
    chunks of at most ``max_tokens // width`` rows (at least one row each)."""
    per = max(1, max_tokens // max(width, 1))
    return [rows[i : i + per] for i in range(0, rows.numel(), per)]


def length_batches(lengths: Sequence[int], max_tokens: int, max_padding: float = math.inf) -> list[np.ndarray]:
    """Row indices sorted by length and cut into batches whose padded size (rows x the longest)
    stays within ``max_tokens`` (one row at least) and whose padding is at most ``max_padding`` of
    their real tokens: little padding, bounded memory."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, start, total = [], 0, 0
    for end in range(len(order)):
        longest, total = lengths[order[end]], total + lengths[order[end]]
        rows = end + 1 - start
        if end > start and (rows * longest > max_tokens or rows * longest > (1 + max_padding) * total):
            batches.append(order[start:end])
            start, total = end, longest
    batches.append(order[start:])
    return batches


def right_padded(rows: Sequence[Sequence], width: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(rows), width] of ``dtype`` (width: the longest row by default), each row's values first,
    zeros after."""
    out = torch.zeros((len(rows), max(len(r) for r in rows) if width is None else width), dtype=dtype)
    for i, vals in enumerate(rows):
        out[i, : len(vals)] = torch.as_tensor(list(vals), dtype=dtype)
    return out
