"""GRESO's pre-rollout filter (Zheng et al., "Act Only When It Pays: Efficient Reinforcement
Learning for LLM Reasoning via Selective Rollouts", arXiv 2506.02177, Sec. 4 and Algorithm 1;
reference code github.com/Infini-AI-Lab/GRESO, ``verl/trainer/ttis/presampling_selector.py`` and
``verl/trainer/ppo/ray_trainer.py``).

A group is zero-variance when all G rewards of a prompt's rollouts are equal (no GRPO gradient):
*easy* when they are all correct (the common reward > 0), *hard* when all wrong (<= 0). GRESO
remembers, per prompt, the run of its most recent consecutive zero-variance appearances of the same
kind, ``z`` (0 after an informative group or before the first appearance). Before rollout it skips
the prompt with probability ``1 - p**z`` (Sec. 4.1, the "probabilistic pre-rollout filtering" rule),
i.e. keeps it -- explores -- with probability ``p**z``, floored at ``min_keep = 0.01`` as in the
reference code; ``p = p_easy`` or ``p_hard`` by the kind of the run. A prompt never seen, or whose
last group was informative, is always kept.

The exploration probabilities adapt after every step (Sec. 4.1, "self-adjustable exploration
rate"): the target zero-variance ratio ``alpha = 0.25`` is split 1/3 to easy and 2/3 to hard prompts
(hard ones get more exploration because they are likelier to become solvable); if this step's share
of easy (hard) zero-variance groups among the rolled-out groups is >= its target, ``p_easy``
(``p_hard``) decreases by ``step = 0.01`` (skip more), else it increases by ``step``, clipped to
``[0.05, 0.95]``. Both start at 0.5. These are the defaults of the paper and of its training scripts
(``train-scripts/*_greso.sh``: ``p_easy=0.5 p_hard=0.5 target_zero_variance=0.25``; ``min_p=0.05,
max_p=0.95`` and the 0.01 step in ``ray_trainer.py``).

Differences from the reference, by design of this trainer: the candidate batch is scanned in a random
order until K prompts are kept (the reference filters a fixed sampling batch and refills it by
dynamic sampling); when the batch runs out first, the K - kept remaining slots are taken from the
skipped prompts (in scan order), so exactly K groups are always rolled out and counted; the
probabilities adapt from the first step (the reference waits for the second epoch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

EASY, HARD = 1, -1   # kinds of zero-variance group; 0: informative


@dataclass(frozen=True)
class GresoParams:
    """GRESO's constants, the paper's defaults (see the module docstring)."""

    p_init: float = 0.5          # initial p_easy = p_hard
    target_zero_var: float = 0.25  # alpha: target share of zero-variance groups (1/3 easy, 2/3 hard)
    step: float = 0.01           # adaptation step of p_easy / p_hard
    p_min: float = 0.05
    p_max: float = 0.95
    min_keep: float = 0.01       # floor of the keep probability p**z

    @property
    def target_easy(self) -> float:
        return self.target_zero_var / 3

    @property
    def target_hard(self) -> float:
        return self.target_zero_var * 2 / 3


def group_kinds(rewards: torch.Tensor, group_size: int) -> list[int]:
    """Kind of each group of ``rewards`` ([num_groups * G], grouped): EASY (all equal, > 0),
    HARD (all equal, <= 0) or 0 (informative)."""
    r = rewards.view(-1, group_size)
    zero_var = (r == r[:, :1]).all(dim=1)
    return [0 if not z else (EASY if float(v) > 0 else HARD) for z, v in zip(zero_var.tolist(), r[:, 0])]


class Greso:
    """Per-prompt zero-variance streaks and the two adaptive exploration probabilities.

    State (checkpointed): ``streaks`` {prompt id: (kind, z)} for prompts whose last group was
    zero-variance (the run length ``z`` and kind are all the rule reads of a prompt's history),
    ``p_easy``, ``p_hard``, and the last step's counts (``last``: skipped, backfilled)."""

    def __init__(self, params: GresoParams = GresoParams()):
        self.params = params
        self.streaks: dict[int, tuple[int, int]] = {}
        self.p_easy = params.p_init
        self.p_hard = params.p_init
        self.last = {"greso_skipped": 0, "greso_backfilled": 0}

    def keep_probability(self, prompt_id: int) -> float:
        """Probability that ``prompt_id`` is rolled out: ``max(p**z, min_keep)``, 1 without a streak."""
        if prompt_id not in self.streaks:
            return 1.0
        kind, z = self.streaks[prompt_id]
        p = self.p_easy if kind == EASY else self.p_hard
        return max(p ** z, self.params.min_keep)

    def select(self, cand: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
        """Positions in ``cand`` (prompt ids) of the k prompts to roll out: scan a random
        permutation, keep each with :meth:`keep_probability` (one uniform draw per scanned prompt),
        stop at k kept; if the batch runs out first, fill up with the skipped ones in scan order."""
        if not 0 < k <= len(cand):
            raise ValueError(f"need 0 < k <= number of candidates, got k={k}, candidates={len(cand)}")
        kept, skipped = [], []
        for i in rng.permutation(len(cand)).tolist():
            if len(kept) == k:
                break
            (kept if rng.random() < self.keep_probability(int(cand[i])) else skipped).append(i)
        backfill = skipped[: k - len(kept)]
        self.last = {"greso_skipped": len(skipped) - len(backfill), "greso_backfilled": len(backfill)}
        return kept + backfill

    def observe(self, prompt_ids: Sequence[int], rewards: torch.Tensor, group_size: int) -> None:
        """After reward: update each prompt's streak from its group of ``rewards`` ([len(ids) * G],
        grouped in ``prompt_ids`` order), then adapt p_easy / p_hard toward their targets."""
        kinds = group_kinds(rewards, group_size)
        if len(kinds) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(kinds)} reward groups of {group_size}")
        for pid, kind in zip(prompt_ids, kinds):
            pid = int(pid)
            if kind == 0:
                self.streaks.pop(pid, None)
                continue
            prev_kind, z = self.streaks.get(pid, (kind, 0))
            self.streaks[pid] = (kind, z + 1 if prev_kind == kind else 1)
        if kinds:
            self.p_easy = self._adapt(self.p_easy, kinds.count(EASY) / len(kinds), self.params.target_easy)
            self.p_hard = self._adapt(self.p_hard, kinds.count(HARD) / len(kinds), self.params.target_hard)

    def _adapt(self, p: float, ratio: float, target: float) -> float:
        """Too many zero-variance groups of this kind: explore less (skip more); too few: explore more."""
        P = self.params
        return max(p - P.step, P.p_min) if ratio >= target else min(p + P.step, P.p_max)

    def stats(self) -> dict:
        """The step record's GRESO fields."""
        return {**self.last, "greso_p_easy": self.p_easy, "greso_p_hard": self.p_hard}

    def state_dict(self) -> dict:
        return {"streaks": {pid: list(v) for pid, v in self.streaks.items()}, "p_easy": self.p_easy,
                "p_hard": self.p_hard, "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.streaks = {int(pid): (int(v[0]), int(v[1])) for pid, v in state["streaks"].items()}
        self.p_easy, self.p_hard = float(state["p_easy"]), float(state["p_hard"])
        self.last = dict(state["last"])
