"""Prompt selection: PREPO's perplexity window and the baselines, behind one interface.

PREPO sorts the candidate batch by prompt perplexity (ascending) and rolls out the K consecutive
prompts starting at ``l = floor(rho * (|B| - K))``, ``rho = pacing(step / total_steps)``: familiar
prompts first, harder ones later.

Each strategy is a :class:`Strategy` record: whether it needs perplexities, how it orders the
candidates, whether it weights rollouts by relative entropy, and whether it samples dynamically
(DAPO: roll out in order of priority, drop groups whose rewards are all equal, refill until K
groups are kept). ``Strategy.select`` returns candidate indices in priority order; a static
strategy uses the first K, a dynamic one keeps consuming the order. ``greso`` filters the candidates
before rollout by their reward history (:mod:`prepo.greso`): the one strategy with state, which it
updates after reward through ``Strategy.observe`` and which travels in checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .config import PACINGS, STRATEGIES
from .greso import Greso
from .rollout import Rollouts

# roll(problems) -> (rollouts, rewards [N] float32, reward failures); G rows per problem, grouped
RollFn = Callable[[Sequence], "tuple[Rollouts, torch.Tensor, int]"]


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


@dataclass(frozen=True)
class Strategy:
    name: str
    order: str        # "window" | "random" | "lowest" | "highest" | "greso"
    weighting: bool   # relative-entropy rollout weights
    dynamic: bool = False
    greso: Optional[Greso] = field(default=None, compare=False)   # order "greso": its filter state

    @property
    def needs_ppl(self) -> bool:
        return self.order in ("window", "lowest", "highest")

    def select(self, ppl: np.ndarray | None, cand: Sequence[int], k: int, rho: float,
               rng: np.random.Generator) -> list[int]:
        """Indices into ``cand`` (the candidate batch's prompt ids) in priority order: exactly k for
        a static strategy, all of them (a random permutation) for a dynamic one."""
        if self.order == "window":
            return window_select(ppl, k, rho).tolist()
        if self.order == "lowest":
            return window_select(ppl, k, 0.0).tolist()
        if self.order == "highest":
            return window_select(ppl, k, 1.0).tolist()
        if self.order == "greso":
            return self.greso.select(cand, k, rng)
        perm = rng.permutation(len(cand))
        return perm.tolist() if self.dynamic else perm[:k].tolist()

    def observe(self, prompt_ids: Sequence[int], rewards: torch.Tensor, group_size: int) -> None:
        """After reward: the rolled-out prompts' rewards ([len(prompt_ids) * G], grouped); only
        GRESO keeps a history."""
        if self.greso is not None:
            self.greso.observe(prompt_ids, rewards, group_size)

    def stats(self) -> Optional[dict]:
        """The strategy's own step-record fields (GRESO's), None for the stateless ones."""
        return self.greso.stats() if self.greso is not None else None

    def state_dict(self) -> Optional[dict]:
        return self.greso.state_dict() if self.greso is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if (state is None) != (self.greso is None):
            raise ValueError(f"the checkpoint's selection state does not match strategy {self.name!r}")
        if state is not None:
            self.greso.load_state_dict(state)


@dataclass
class Collected:
    """What a step rolled out and keeps for the update (rollouts None: nothing kept)."""

    problems: list
    rollouts: Optional[Rollouts]
    rewards: Optional[torch.Tensor]
    failures: int
    dynamic: Optional[dict] = None


def collect_static(problems: Sequence, roll: RollFn) -> Collected:
    ro, rewards, failures = roll(problems)
    return Collected(list(problems), ro, rewards, failures)


def collect_dynamic(first: Sequence, refill: Callable[[], Sequence], roll: RollFn, *, k: int, group_size: int,
                    max_rounds: int, pad_id: int) -> Collected:
    """DAPO dynamic sampling: roll out candidates (``first``, problems in priority order) k at a
    time, keep the groups whose rewards are not all equal, take the next candidate batch from
    ``refill()`` when one is spent, until k groups are kept or ``max_rounds`` batches are spent.
    Every generated rollout is counted by the engine, kept or not."""
    G = group_size
    kept_ro: list[Rollouts] = []
    kept_r: list[torch.Tensor] = []
    kept: list = []
    queue, rounds, pos, failures, generated = list(first), 1, 0, 0, 0
    while len(kept) < k:
        if pos >= len(queue):
            if rounds >= max_rounds:
                break
            rounds += 1
            queue, pos = list(refill()), 0
        problems = queue[pos : pos + k - len(kept)]
        pos += len(problems)
        ro, r, f = roll(problems)
        failures += f
        generated += len(problems)
        r = r.view(-1, G)
        keep = [g for g in range(len(problems)) if bool((r[g] != r[g, 0]).any())]
        if keep:
            kept_ro.append(ro.select([g * G + j for g in keep for j in range(G)]))
            kept_r.append(r[keep].reshape(-1))
            kept += [problems[g] for g in keep]
    stats = {"dynamic_rounds": rounds, "dynamic_groups_generated": generated, "dynamic_groups_kept": len(kept)}
    if not kept:
        return Collected([], None, None, failures, stats)
    return Collected(kept, Rollouts.concat(kept_ro, pad_id), torch.cat(kept_r), failures, stats)


_STRATEGIES = {
    "prepo": Strategy("prepo", "window", weighting=True),
    "random": Strategy("random", "random", weighting=False),
    "ppl_only": Strategy("ppl_only", "window", weighting=False),
    "entropy_only": Strategy("entropy_only", "random", weighting=True),
    "static_low_ppl": Strategy("static_low_ppl", "lowest", weighting=False),
    "static_high_ppl": Strategy("static_high_ppl", "highest", weighting=False),
    "dapo_dynamic": Strategy("dapo_dynamic", "random", weighting=False, dynamic=True),
    "greso": Strategy("greso", "greso", weighting=False),
}
assert set(_STRATEGIES) == set(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy ``name``; GRESO's comes with a fresh filter state, owned by the caller."""
    if name not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(_STRATEGIES)}; got {name!r}")
    s = _STRATEGIES[name]
    return dataclasses.replace(s, greso=Greso()) if s.order == "greso" else s


class PromptSampler:
    """Candidate batches drawn without replacement from a reshuffled permutation each epoch.
    Its whole state is (epoch, cursor): deterministic given the seed, cheap to checkpoint."""

    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError("the training set is empty")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 7919]).permutation(self.num_items)

    def next_batch(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            if self.cursor >= self.num_items:
                self.epoch += 1
                self.cursor = 0
                self._perm = self._permutation(self.epoch)
            take = min(size - len(out), self.num_items - self.cursor)
            out += self._perm[self.cursor : self.cursor + take].tolist()
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError("sampler state is for a different data set or seed")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)
