"""PREPO's curriculum position and perplexity window.

The candidate batch is sorted by prompt perplexity (ascending) and the K consecutive prompts
starting at ``l = floor(rho * (|B| - K))`` are rolled out, ``rho = pacing(step / total_steps)``:
familiar prompts first, harder ones later.
"""
from __future__ import annotations

import math

import numpy as np

PACINGS = ("linear", "quadratic", "exponential")


def pacing_rho(step: int, total_steps: int, pacing: str = "linear") -> float:
    """Curriculum position in [0, 1] at ``step`` (0-based) of ``total_steps``."""
    x = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if pacing == "linear":
        return x
    if pacing == "quadratic":
        return x * x
    if pacing == "exponential":
        k = 5.0
        return (math.exp(k * x) - 1.0) / (math.exp(k) - 1.0)
    raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")


def window_start(rho: float, n: int, k: int) -> int:
    """l = floor(rho * (n - k)), clamped to [0, n - k]."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    return min(max(int(math.floor(rho * (n - k))), 0), n - k)


def window_select(ppl: np.ndarray, k: int, rho: float) -> np.ndarray:
    """Indices of the window of ``k`` prompts at ``rho`` in the ascending-perplexity order
    (stable sort, so ties keep candidate order and the choice is deterministic)."""
    order = np.argsort(np.asarray(ppl), kind="stable")
    start = window_start(rho, len(order), k)
    return order[start : start + k]
