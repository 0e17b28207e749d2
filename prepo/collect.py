"""What a step rolls out and keeps: the selected prompts (static), or DAPO dynamic sampling's
refills until K informative groups are kept. Both count every rollout they generate, kept or
not (cumulative rollouts is the x-axis of PREPO's efficiency claim)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .rollout import Rollouts, Scored

RollFn = Callable[[Sequence], Scored]   # roll(problems) -> G rollouts per problem, grouped, rewarded


@dataclass
class Collected:
    """This rank's kept rollouts of a step (``rollouts`` None: nothing kept) and what it cost."""

    problems: list
    rollouts: Optional[Rollouts]
    rewards: Optional[torch.Tensor]   # [N] float32
    failures: int                     # reward calls that raised (those rewards are 0)
    generated: int                    # rollouts generated, kept or not
    dynamic: Optional[dict] = None    # dynamic sampling: rounds, groups generated and kept


def collect_static(problems: Sequence, roll: RollFn) -> Collected:
    got = roll(problems)
    return Collected(list(problems), got.rollouts, got.rewards, got.failures, len(got.rollouts))


def collect_dynamic(first: Sequence, refill: Callable[[], Sequence], roll: RollFn, *, k: int, group_size: int,
                    max_rounds: int, pad_id: int) -> Collected:
    """DAPO dynamic sampling: roll out candidates (``first``, problems in priority order) k at a
    time, keep the groups whose rewards are not all equal, take the next candidate batch from
    ``refill()`` when one is spent, until k groups are kept or ``max_rounds`` batches are spent."""
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
        got = roll(problems)
        failures += got.failures
        generated += len(problems)
        r = got.rewards.view(-1, G)
        keep = [g for g in range(len(problems)) if bool((r[g] != r[g, 0]).any())]
        if keep:
            kept_ro.append(got.rollouts.select([g * G + j for g in keep for j in range(G)]))
            kept_r.append(r[keep].reshape(-1))
            kept += [problems[g] for g in keep]
    stats = {"dynamic_rounds": rounds, "dynamic_groups_generated": generated, "dynamic_groups_kept": len(kept)}
    if not kept:
        return Collected([], None, None, failures, generated * G, stats)
    return Collected(kept, Rollouts.concat(kept_ro, pad_id), torch.cat(kept_r), failures, generated * G, stats)
