"""Rewards: a TRL-style ``reward_fn(prompts, completions, **columns) -> list[float]`` and a safe
caller. The built-in checker parses and verifies answers with math-verify (measured at ~0.4 ms an
item on this CPU, cheap next to generation). A reward function that raises gives reward 0 for
the items it failed on; failures are counted and logged and the run goes on.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]


@functools.lru_cache(maxsize=65536)
def _check(completion: str, gold: str) -> float:
    """math-verify's verdict; memoized because a group's G samples often repeat the same text
    (a pure function of its two strings)."""
    from math_verify import parse, verify

    pred = parse(completion)
    return 1.0 if pred and verify(parse(gold), pred) else 0.0


def math_verify_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **columns) -> list[float]:
    """1.0 when math-verify finds the completion equal to the gold answer, else 0.0."""
    return [_check(str(c), str(g)) for c, g in zip(completions, answer)]


reward_fn = math_verify_reward


def compute_rewards(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], **columns) -> tuple[list[float], int]:
    """(rewards, number of items whose reward could not be computed). Calls ``fn`` on the whole
    batch; if it raises or returns something unusable, calls it item by item and gives 0 to each
    item that raises (or returns None / a non-number)."""
    n = len(completions)
    try:
        values = list(fn(prompts, completions, **columns))
        if len(values) == n and all(_is_number(v) for v in values):
            return [float(v) for v in values], 0
        log.warning("reward function returned %d values (need %d numbers); scoring item by item", len(values), n)
    except Exception as exc:  # noqa: BLE001 -- a user reward function may raise anything
        log.warning("reward function raised %s: %s; scoring item by item", type(exc).__name__, exc)
    rewards, failures = [], 0
    for i in range(n):
        item_cols = {k: [v[i]] for k, v in columns.items()}
        try:
            value = list(fn([prompts[i]], [completions[i]], **item_cols))
            if len(value) != 1 or not _is_number(value[0]):
                raise ValueError(f"returned {value!r}")
            rewards.append(float(value[0]))
        except Exception as exc:  # noqa: BLE001
            failures += 1
            rewards.append(0.0)
            log.debug("reward failed on item %d: %s", i, exc)
    return rewards, failures


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
