"""Prompt-selection strategies: PREPO's perplexity window and the baselines, one object each,
in one registry (:data:`STRATEGIES`).

A strategy says what it needs and the trainer asks, never names it:

* ``needs_ppl``: whether :meth:`Strategy.select` reads the candidates' perplexities (the trainer
  scores them only then);
* ``weighting``: whether rollouts get relative-entropy weights;
* ``refills``: whether it over-samples, DAPO dynamic sampling (roll out in priority order, drop
  groups whose rewards are all equal, refill from new candidate batches until K groups are kept);
  :meth:`Strategy.select` then returns every candidate in priority order, not just K;
* ``single_process``: its state is not shared across data-parallel ranks;
* ``moving_window``: a perplexity window that walks with the curriculum position (the premise
  estimate's probes and the curriculum direction steer it);
* ``needs_levels``: whether :meth:`Strategy.select` reads the candidates' difficulty levels (the
  trainer hands it every training problem's level once, :meth:`LevelOracle.set_levels`);
* :meth:`Strategy.observe` sees the rolled-out prompts' rewards (GRESO's reward history) and
  :meth:`Strategy.state_dict` / :meth:`Strategy.load_state_dict` carry that state in checkpoints;
  :meth:`Strategy.stats` adds the strategy's own fields to the step record.

``get_strategy(name)`` builds a fresh object, so each run owns its state.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .greso import Greso
from .pacing import window_select


class Strategy:
    """The stateless default: a random K of the candidates, no weights, nothing observed."""

    needs_ppl = False
    weighting = False
    refills = False
    single_process = False
    moving_window = False
    needs_levels = False

    def __init__(self, name: str, *, weighting: bool = False):
        self.name = name
        self.weighting = weighting

    def select(self, ppl: Optional[np.ndarray], cand: Sequence[int], k: int, rho: float,
               rng: np.random.Generator) -> list[int]:
        """Indices into ``cand`` (the candidate batch's prompt ids) in priority order: exactly k,
        or all of them for a strategy that ``refills``. ``ppl`` [len(cand)] when ``needs_ppl``."""
        perm = rng.permutation(len(cand))
        return perm.tolist() if self.refills else perm[:k].tolist()

    def observe(self, prompt_ids: Sequence[int], rewards: torch.Tensor, group_size: int) -> None:
        """After reward: the rolled-out prompts' rewards ([len(prompt_ids) * G], grouped)."""

    def stats(self) -> Optional[dict]:
        """The strategy's own step-record fields, None when it has none."""
        return None

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            raise ValueError(f"the checkpoint holds selection state, which strategy {self.name!r} does not have")


class Window(Strategy):
    """The K prompts of the perplexity window at ``rho`` (PREPO), or at a fixed position
    (0: always the K lowest, 1: always the K highest)."""

    needs_ppl = True

    def __init__(self, name: str, *, weighting: bool = False, fixed_rho: Optional[float] = None):
        super().__init__(name, weighting=weighting)
        self.fixed_rho = fixed_rho
        self.moving_window = fixed_rho is None

    def select(self, ppl, cand, k, rho, rng):
        return window_select(ppl, k, rho if self.fixed_rho is None else self.fixed_rho).tolist()


class DapoDynamic(Strategy):
    """DAPO dynamic sampling: every candidate in a random order, refilled until K informative groups."""

    refills = True
    single_process = True   # each rank would refill on its own


class GresoFilter(Strategy):
    """GRESO's pre-rollout filter (:mod:`prepo.signals.greso`): the one strategy with state."""

    single_process = True

    def __init__(self, name: str):
        super().__init__(name)
        self.greso = Greso()

    def select(self, ppl, cand, k, rho, rng):
        return self.greso.select(cand, k, rng)

    def observe(self, prompt_ids, rewards, group_size):
        self.greso.observe(prompt_ids, rewards, group_size)

    def stats(self):
        return self.greso.stats()

    def state_dict(self):
        return self.greso.state_dict()

    def load_state_dict(self, state):
        if state is None:
            raise ValueError(f"the checkpoint holds no selection state, which strategy {self.name!r} needs")
        self.greso.load_state_dict(state)


class LevelOracle(Strategy):
    """A positive control that reads the answer key: the K candidates whose difficulty level is
    closest to the middle of the training problems' levels ((lowest + highest) / 2), ties in a
    random order. No weights, no perplexities."""

    needs_levels = True

    def __init__(self, name: str):
        super().__init__(name)
        self.levels: Optional[np.ndarray] = None   # [training problems] level of each, by train index
        self.target = float("nan")                 # the level it aims at

    def set_levels(self, levels: Sequence[int]) -> None:
        """Every training problem's difficulty level (0 = easiest), by train index."""
        self.levels = np.asarray(levels, dtype=float)
        self.target = float(self.levels.min() + self.levels.max()) / 2

    def select(self, ppl, cand, k, rho, rng):
        if self.levels is None:
            raise RuntimeError(f"strategy {self.name!r} selects by level: call set_levels first")
        perm = rng.permutation(len(cand))   # a random order first, so equal distances tie at random
        distance = np.abs(self.levels[np.asarray(cand)[perm]] - self.target)
        return perm[np.argsort(distance, kind="stable")][:k].tolist()


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "prepo": lambda: Window("prepo", weighting=True),
    "random": lambda: Strategy("random"),
    "ppl_only": lambda: Window("ppl_only"),
    "entropy_only": lambda: Strategy("entropy_only", weighting=True),
    "static_low_ppl": lambda: Window("static_low_ppl", fixed_rho=0.0),
    "static_high_ppl": lambda: Window("static_high_ppl", fixed_rho=1.0),
    "dapo_dynamic": lambda: DapoDynamic("dapo_dynamic"),
    "greso": lambda: GresoFilter("greso"),
    "oracle_level": lambda: LevelOracle("oracle_level"),
}


def get_strategy(name: str) -> Strategy:
    """A fresh strategy ``name`` (its state, if any, owned by the caller)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    return STRATEGIES[name]()
