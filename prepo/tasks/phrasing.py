"""Testbed 2: arithmetic in several phrasings, where familiarity is decoupled from difficulty.

The problems and worked solutions are those of :mod:`prepo.tasks.arithmetic`, but each prompt is
written in one of four phrasings of the same expression:

  plain     ``3+4*5-2=``
  spaced    ``3 + 4 * 5 - 2 =``
  question  ``q:3+4*5-2?``
  words     ``3p4t5m2=``   (p plus, m minus, t times)

The warm-up corpus uses the phrasings with very different frequencies (:data:`WARMUP_PHRASING_WEIGHTS`)
and every level equally often, while the RL pool and the held-out split use every phrasing and
level equally often. So how familiar a prompt looks to the policy (its perplexity) depends on its
phrasing, which is independent of how hard the problem is (its level); what ties perplexity to
the pass rate is only that the policy practised rare phrasings less -- the regime the paper reports
(Spearman about -0.2 on DAPO-Math-17K), not the arithmetic testbed's, where rarer levels are both
less familiar and harder (about -0.64).

The corpus also writes the operands of ``+`` and ``*`` steps in either order (``"4*5=20"`` or
``"5*4=20"``): harmless variety spread over the whole solution, so a rollout's token entropy is
not concentrated in a few slips. An expression and all its phrasings fall on the same side of the
held-out split.
"""
from __future__ import annotations

import random

from .arithmetic import NUM_LEVELS, evaluate_expression, random_expression, worked_solution
from .base import BuiltinTask, Problem

PHRASINGS = ("plain", "spaced", "question", "words")
WARMUP_PHRASING_WEIGHTS = (0.6, 0.25, 0.1, 0.05)
SWAP_RATE = 0.5       # corpus: probability that a + / * step writes its operands the other way round
_WORDS = {"+": "p", "-": "m", "*": "t"}


def phrase(expr: str, phrasing: str) -> str:
    """``expr`` (e.g. ``"3+4*5"``) written as a prompt in ``phrasing``."""
    if phrasing == "plain":
        return expr + "="
    if phrasing == "spaced":
        return " ".join(expr) + " ="
    if phrasing == "question":
        return f"q:{expr}?"
    if phrasing == "words":
        return "".join(_WORDS.get(ch, ch) for ch in expr) + "="
    raise ValueError(f"unknown phrasing {phrasing!r}; known: {', '.join(PHRASINGS)}")


def canonical(prompt: str) -> str:
    """The expression a prompt in any phrasing states: ``"q:3+4?"`` -> ``"3+4"``."""
    text = prompt.replace(" ", "").removeprefix("q:").rstrip("=?")
    for op, word in _WORDS.items():
        text = text.replace(word, op)
    return text


def make_problem(rng: random.Random, level: int, for_warmup: bool = False) -> Problem:
    """One problem of ``level`` in a phrasing drawn with the warm-up's weights (``for_warmup``) or
    uniformly (the RL pool and the held-out split)."""
    expr = random_expression(rng, level)
    weights = WARMUP_PHRASING_WEIGHTS if for_warmup else None
    phrasing = rng.choices(PHRASINGS, weights=weights)[0]
    return Problem(prompt=phrase(expr, phrasing), answer=str(evaluate_expression(expr)), difficulty=level,
                   columns={"phrasing": phrasing})


def corpus_solution(problem: Problem, rng: random.Random, slip_rate: float) -> str:
    return worked_solution(canonical(problem.prompt), rng, slip_rate, swap_rate=SWAP_RATE)


TASK = BuiltinTask(
    name="phrasing", chars="0123456789+-*=, q:?pmt", num_levels=NUM_LEVELS,
    warmup_level_weights=(1.0,) * NUM_LEVELS,
    make_problem=make_problem, corpus_solution=corpus_solution, split_key=canonical,
)
