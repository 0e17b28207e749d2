"""What every built-in task shares: the :class:`Problem` record, the held-out split, and the
:class:`BuiltinTask` interface with its problem generators.

A built-in task is a small verifiable problem family for CPU runs: it makes problems of graded
difficulty (levels, 0 = easiest), writes the worked solutions its warm-up corpus teaches, names
the characters its prompts and solutions use (the built-in model's tokenizer) and, when plain
math answer checking does not fit, its own reward.

Splits are disjoint by construction: a problem belongs to the held-out split iff a hash of its
split key (by default the prompt text) falls in the held-out bucket, so no generation order or
seed can leak an evaluation problem into training. Everything is deterministic given the seed.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from ..errors import DataError


# A prompt is plain text or a chat: a list of {"role": ..., "content": ...} messages.
Prompt = Union[str, list]


def prompt_key(prompt: Prompt) -> str:
    """A prompt as one string, equal for equal prompts (text as is, a chat as sorted-key JSON):
    the key of the encoder's cache, the train / held-out overlap check and duplicate counting."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


@dataclass(frozen=True)
class Problem:
    prompt: Prompt                   # e.g. "2+7*3=", or [{"role": "user", "content": "..."}]
    answer: str                      # e.g. "23" (the gold answer as text)
    difficulty: Optional[int] = None  # level, 0 = easiest; None when the data has none
    # The row's other columns (verl: data_source, extra_info, reward_model...), passed to a
    # TRL-style reward function as keyword lists. Not part of equality.
    columns: dict = field(default_factory=dict, compare=False)


def is_heldout(key: str, heldout_frac: float = 0.15) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return (h % 10_000) < int(heldout_frac * 10_000)


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in problem family.

    ``make_problem(rng, level, for_warmup)`` draws one problem of ``level``; ``for_warmup`` says it
    is for the warm-up corpus, whose prompt distribution may differ from the RL pool's (that is
    how a task makes some prompts more familiar than others). ``corpus_solution(problem, rng,
    slip_rate)`` is the worked solution the warm-up trains on, each step wrong with probability
    ``slip_rate``. ``split_key(prompt)`` is what the held-out hash reads (problems with one key
    are all on one side). ``reward`` is a TRL-style ``fn(prompts, completions, answer, **columns)``,
    None for math answer checking of the last number."""

    name: str
    chars: str                        # the alphabet of prompts and solutions (one token each)
    num_levels: int
    warmup_level_weights: tuple       # the warm-up corpus's level mix
    make_problem: Callable[[random.Random, int, bool], Problem]
    corpus_solution: Callable[[Problem, random.Random, float], str]
    split_key: Callable[[str], str] = lambda prompt: prompt
    reward: Optional[Callable] = None
    needs_model: bool = False         # written for a pretrained LM (--model), not the character-level toy

    def _check_weights(self, weights: Optional[Sequence[float]]) -> list[float]:
        w = list(weights) if weights is not None else [1.0] * self.num_levels
        if len(w) != self.num_levels or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"level_weights must be {self.num_levels} non-negative numbers with a positive sum "
                             f"for task {self.name!r}; got {weights}")
        return w

    def in_split(self, problem: Problem, split: str, heldout_frac: float) -> bool:
        """Whether ``problem`` belongs to ``split`` ("train" or "eval") by the held-out hash."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return is_heldout(self.split_key(problem.prompt), heldout_frac) == (split == "eval")

    def generate(self, n: int, seed: int, split: str = "train", level_weights: Sequence[float] | None = None,
                 heldout_frac: float = 0.15, unique: bool = True, for_warmup: bool = False) -> list[Problem]:
        """``n`` problems of ``split`` ("train" or "eval"), levels drawn with ``level_weights``
        (default uniform). Deterministic given the arguments. With ``unique`` no prompt repeats;
        if a level's space is exhausted the remaining draws go to other levels."""
        weights = self._check_weights(level_weights)
        rng = random.Random(f"{seed}-{split}")
        out: list[Problem] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise DataError(f"could not generate {n} distinct {split} problems (got {len(out)})")
            level = rng.choices(range(self.num_levels), weights=weights)[0]
            p = self.make_problem(rng, level, for_warmup)
            if not self.in_split(p, split, heldout_frac):
                continue
            if unique:
                if p.prompt in seen:
                    continue
                seen.add(p.prompt)
            out.append(p)
        return out

    def balanced(self, n_per_level: int, seed: int, split: str, heldout_frac: float = 0.15) -> list[Problem]:
        """``n_per_level`` distinct problems of each level (fewer if a level's split is smaller)."""
        out: list[Problem] = []
        for level in range(self.num_levels):
            rng = random.Random(f"{seed}-{split}-L{level}")
            seen: set[str] = set()
            tries = 0
            while len(seen) < n_per_level and tries < 50 * n_per_level + 2000:
                tries += 1
                p = self.make_problem(rng, level, False)
                if not self.in_split(p, split, heldout_frac) or p.prompt in seen:
                    continue
                seen.add(p.prompt)
                out.append(p)
        return out

    def check_alphabet(self, problems: Sequence[Problem], source: str) -> None:
        """Raise :class:`DataError` unless every prompt is text in this task's alphabet: the built-in
        model's character tokenizer reads nothing else (other data needs ``--model``)."""
        for p in problems:
            bad = sorted(set(p.prompt) - set(self.chars)) if isinstance(p.prompt, str) else ["<chat prompt>"]
            if bad:
                raise DataError(f"{source}: prompt {p.prompt!r} has characters outside the built-in {self.name} "
                                f"task's alphabet {self.chars!r}: {bad}; the built-in model reads only that "
                                "alphabet, name a model with --model for other data")
