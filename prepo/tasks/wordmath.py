"""``wordmath``: arithmetic and short word problems in natural language, for a real pretrained chat
model (SmolLM2-135M-Instruct and up), not for the character-level toy.

A prompt is plain English text, asked with the model's chat template (run with ``--chat-template``)
and answered in free text; the reward is math-verify on the completion's final number
(:func:`prepo.rewards.math_reward`), so "7 + 5 = 12. The answer is 12." scores 1. Levels
(0 = easiest) grow the numbers and the steps:

====  ==================================================  =====================
level example                                             steps
====  ==================================================  =====================
0     What is 4 + 3?                                      1, one-digit +
1     What is 27 + 8?                                     1, two-digit + one-digit
2     What is 6 times 7?  /  What is 15 - 8?              1, times table or -
3     Anna has 12 apples. She gives 5 apples to Ben. ...  1, a story, + or -
4     Tom buys 4 boxes of 6 pens and loses 3 pens. ...    2, a story, * then -
====  ==================================================  =====================

The held-out split hashes the prompt with its names and objects blanked out, so one problem told
about "Anna" and about "Ben" cannot land on both sides.
"""
from __future__ import annotations

import random
import re
import string

from .base import BuiltinTask, Problem

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Lily", "Omar", "Sara", "Tom")
ITEMS = ("apples", "books", "cookies", "marbles", "pencils", "stickers", "cards", "shells")
NUM_LEVELS = 5
_BLANK = re.compile(r"\b(?:%s)\b" % "|".join(NAMES + ITEMS + ("He", "She")))
_PRONOUN = {n: ("She" if n in ("Anna", "Carla", "Emma", "Grace", "Lily", "Sara") else "He") for n in NAMES}


def _story_one_step(rng: random.Random) -> tuple[str, int]:
    name, friend = rng.sample(NAMES, 2)
    item, he = rng.choice(ITEMS), _PRONOUN[name]
    a = rng.randint(5, 20)
    if rng.random() < 0.5:
        b = rng.randint(2, 9)
        return (f"{name} has {a} {item}. {friend} gives {name} {b} more {item}. "
                f"How many {item} does {name} have now?", a + b)
    b = rng.randint(1, a - 1)
    return (f"{name} has {a} {item}. {he} gives {b} {item} to {friend}. "
            f"How many {item} does {name} have left?", a - b)


def _story_two_step(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per_box = rng.randint(2, 5), rng.randint(2, 9)
    lost = rng.randint(1, boxes * per_box - 1)
    return (f"{name} buys {boxes} bags with {per_box} {item} in each bag, then loses {lost} {item}. "
            f"How many {item} does {name} have?", boxes * per_box - lost)


def make_problem(rng: random.Random, level: int, for_warmup: bool = False) -> Problem:
    if level == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        text, answer = f"What is {a} + {b}?", a + b
    elif level == 1:
        a, b = rng.randint(11, 89), rng.randint(2, 9)
        text, answer = f"What is {a} + {b}?", a + b
    elif level == 2:
        if rng.random() < 0.5:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            text, answer = f"What is {a} times {b}?", a * b
        else:
            a = rng.randint(10, 19)
            b = rng.randint(2, 9)
            text, answer = f"What is {a} - {b}?", a - b
    elif level == 3:
        text, answer = _story_one_step(rng)
    elif level == 4:
        text, answer = _story_two_step(rng)
    else:
        raise ValueError(f"level must be in 0..{NUM_LEVELS - 1}, got {level}")
    return Problem(text, str(answer), difficulty=level)


def split_key(prompt: str) -> str:
    """The prompt with names and objects blanked: the problem itself, whoever it is told about."""
    return _BLANK.sub("_", prompt)


def corpus_solution(problem: Problem, rng: random.Random, slip_rate: float) -> str:
    """The bare answer (off by 1 with probability ``slip_rate``), the form the interface asks for;
    the task needs a pretrained model (``needs_model``), so no warm-up trains on it."""
    answer = int(problem.answer)
    return str(answer + (rng.choice((-1, 1)) if slip_rate > 0 and rng.random() < slip_rate else 0))


TASK = BuiltinTask(
    name="wordmath",
    chars=string.ascii_letters + string.digits + " .,?+-",
    num_levels=NUM_LEVELS,
    warmup_level_weights=(0.35, 0.25, 0.2, 0.12, 0.08),
    make_problem=make_problem,
    corpus_solution=corpus_solution,
    split_key=split_key,
    needs_model=True,
)
