"""Micro-batches by a token budget: every forward (scoring, old log-probs, update) holds at most
``max_tokens`` padded tokens, so peak activation memory is set by an option, not by the batch."""
from __future__ import annotations

import torch


def token_chunks(rows: torch.Tensor, width: int, max_tokens: int) -> list[torch.Tensor]:
    """Split the row indices ``rows`` [N] of a batch padded to ``width`` tokens into consecutive
    chunks of at most ``max_tokens // width`` rows (at least one row each)."""
    per = max(1, max_tokens // max(width, 1))
    return [rows[i : i + per] for i in range(0, rows.numel(), per)]
