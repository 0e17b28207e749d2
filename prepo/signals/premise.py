"""PREPO's premise, checked on the rollouts: does a prompt's perplexity rank tell how hard it is?

The paper's curriculum runs its window from low to high perplexity because low-perplexity prompts
were the easier ones (Spearman(perplexity, pass rate) about -0.2 on DAPO-Math-17K). On other data
the sign can differ, so the trainer measures it while it trains:

* :func:`premise_stats`: Spearman of perplexity against pass rate, and the partial Spearman with
  log prompt length held fixed (a whole-prompt score on short prompts mostly measures length);
* :class:`Premise`: a running estimate over the last ``window_steps`` steps -- each rolled-out
  prompt's perplexity rank within its candidate batch (0 = lowest, 1 = highest) against its
  group's pass rate -- with ``probes`` of the K rollout slots drawn uniformly from the rest of the
  candidate batch, so the estimate is not confined to the window's band; and the curriculum
  direction (``low_to_high``, ``high_to_low``, or ``auto``: turned around when the estimate is
  reliably of the other sign).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("prepo")

DIRECTIONS = ("low_to_high", "high_to_low", "auto")
ALPHA = 0.05


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Spearman rho, two-sided p-value); (nan, nan) with fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    rho, p = spearmanr(x, y)
    return float(rho), float(p)


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> tuple[float, float]:
    """Spearman of ``x`` and ``y`` with ``z`` held fixed: the partial correlation of the three
    pairwise rank correlations, r = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)), and its
    two-sided p-value (t test with n - 3 degrees of freedom)."""
    from scipy.stats import t as student_t

    (rxy, _), (rxz, _), (ryz, _) = spearman(x, y), spearman(x, z), spearman(y, z)
    n = len(x)
    denom = (1 - rxz ** 2) * (1 - ryz ** 2)
    if n < 4 or not denom > 0:
        return math.nan, math.nan
    r = (rxy - rxz * ryz) / math.sqrt(denom)
    if abs(r) >= 1:
        return float(np.sign(r)), 0.0
    t = r * math.sqrt((n - 3) / (1 - r * r))
    return float(r), float(2 * student_t.sf(abs(t), n - 3))


def premise_stats(ppl: Sequence[float], pass_rate: Sequence[float], length: Sequence[float]) -> dict:
    """Spearman(perplexity, pass rate) and the partial one given log ``length`` (e.g. words of the
    problem), each with its p-value."""
    rho, p = spearman(ppl, pass_rate)
    prho, pp = partial_spearman(ppl, pass_rate, np.log(np.asarray(length, dtype=float)))
    return {"spearman": rho, "pvalue": p, "partial_spearman_loglen": prho, "partial_pvalue": pp}


@dataclass(frozen=True)
class PremiseParams:
    """``direction``: one of :data:`DIRECTIONS`; ``probes``: rollout slots per step drawn uniformly
    from the candidates outside the window; ``window_steps``: steps the estimate pools. ``auto``
    takes the estimate's sign as reliable when its two-sided p-value is below :data:`ALPHA`."""

    direction: str = "low_to_high"
    probes: int = 0
    window_steps: int = 5

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"curriculum_direction must be one of {', '.join(DIRECTIONS)}; got {self.direction!r}")
        if self.probes < 0 or self.window_steps < 1:
            raise ValueError("need premise_probes >= 0 and premise_window_steps >= 1")


class Premise:
    """The running estimate and the curriculum direction it sets (see the module docstring)."""

    def __init__(self, params: PremiseParams = PremiseParams()):
        self.params = params
        self.high_to_low = params.direction == "high_to_low"
        self.steps: deque = deque(maxlen=params.window_steps)   # per step: (ranks, pass rates)
        self.turned_at: Optional[int] = None                   # the step auto last turned the window at
        self.window_size = 0                                   # the last selection's window (without probes)
        self.seen = False                                      # whether any step was observed (a scoring strategy)

    def position(self, rho: float) -> float:
        """The window's position in the ascending-perplexity order at curriculum progress ``rho``."""
        return 1.0 - rho if self.high_to_low else rho

    def select(self, strategy, ppl: np.ndarray, cand: Sequence[int], k: int, rho: float,
               rng: np.random.Generator) -> list[int]:
        """Indices into ``cand``: the strategy's window of ``k - probes`` prompts at :meth:`position`,
        then ``probes`` drawn uniformly from the other candidates (no RNG drawn without probes);
        without perplexities (``ppl`` None) the strategy's own choice."""
        if ppl is None:
            return strategy.select(ppl, cand, k, rho, rng)
        probes = max(min(self.params.probes, k - 1, len(cand) - k), 0)
        order = strategy.select(ppl, cand, k - probes, self.position(rho), rng)
        self.window_size = len(order)
        if probes > 0:
            rest = np.setdiff1d(np.arange(len(cand)), order)
            order = order + rng.choice(rest, probes, replace=False).tolist()
        return order

    def observe(self, ppl: Optional[np.ndarray], order: Sequence[int], pass_rates: Sequence[float], step: int) -> None:
        """After the rollouts of ``step``: the perplexity ranks within the candidate batch ([len(ppl)]
        scores) of the rolled-out prompts ``order`` and their groups' pass rates, in that order;
        then :meth:`update_direction`. Nothing without perplexities (``ppl`` None)."""
        if ppl is None:
            return
        self.seen = True
        ranks = np.argsort(np.argsort(np.asarray(ppl), kind="stable"), kind="stable") / max(len(ppl) - 1, 1)
        self.steps.append(([float(ranks[i]) for i in order[: len(pass_rates)]], [float(r) for r in pass_rates]))
        self.update_direction(step)

    def estimate(self) -> tuple[float, float, int]:
        """(Spearman rho, p-value, prompts) pooled over the last ``window_steps`` steps."""
        ranks = [r for s in self.steps for r in s[0]]
        rates = [r for s in self.steps for r in s[1]]
        return (*spearman(ranks, rates), len(ranks))

    def update_direction(self, step: int) -> None:
        """``auto``: turn the window around when the estimate is reliably of the sign that says the
        current direction runs from the harder prompts to the easier (positive for low-to-high)."""
        if self.params.direction != "auto":
            return
        rho, p, n = self.estimate()
        if not p < ALPHA or (rho > 0) != (not self.high_to_low):
            return
        self.high_to_low = not self.high_to_low
        self.turned_at = step
        log.warning("step %d: premise estimate Spearman(ppl rank, pass rate) = %+.3f (p = %.2g, %d prompts over the "
                    "last %d steps): the curriculum window now runs %s", step, rho, p, n, len(self.steps),
                    "high to low perplexity" if self.high_to_low else "low to high perplexity")
        self.steps.clear()   # the next turn needs fresh evidence under the new direction

    def stats(self) -> Optional[dict]:
        """The step record's fields: the estimate (None until it has 3 prompts), its p-value and
        size, and the direction in force (+1 low-to-high, -1 high-to-low); None when nothing was
        observed (a strategy that does not score prompts)."""
        if not self.seen:
            return None
        rho, p, n = self.estimate()
        return {"premise_spearman": None if math.isnan(rho) else round(rho, 6),
                "premise_pvalue": None if math.isnan(p) else round(p, 6), "premise_prompts": n,
                "premise_direction": -1 if self.high_to_low else 1}

    def state_dict(self) -> dict:
        return {"high_to_low": self.high_to_low, "steps": [list(map(list, s)) for s in self.steps],
                "turned_at": self.turned_at, "seen": self.seen}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None:   # a checkpoint from before the estimate: start it afresh
            return
        self.high_to_low, self.turned_at, self.seen = state["high_to_low"], state["turned_at"], state["seen"]
        self.steps.clear()
        self.steps.extend(tuple(s) for s in state["steps"])
