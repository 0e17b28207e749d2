"""``wordmath``: arithmetic and short word problems in natural language, for a real pretrained chat
model (SmolLM2-135M-Instruct and up), not for the character-level toy.

A prompt is plain English text, asked with the model's chat template (run with ``--chat-template``)
and answered in free text; the reward is math-verify on the completion's final number
(:func:`prepo.rewards.math_reward`), so "7 + 5 = 12. The answer is 12." scores 1. The levels
(0 = easiest) are ordered by SmolLM2-135M-Instruct's measured pass rate (8 samples at temperature
0.7, "Answer with the number only.", 32 new tokens, 12-16 prompts per family and phrasing), so that
its pass rates spread over 0..1 rather than piling up at 0. Sums and differences come in several
phrasings ("What is 4 + 3?", "What is 4 plus 3?", "Calculate 4 + 3.", "Compute 4 + 3.", "4 + 3 = ?"),
which also gives the easy levels enough distinct prompts:

====  ===============================================================  =======================
level problems                                                         base pass rate
====  ===============================================================  =======================
0     a + b, sums up to 9, four phrasings                              0.53 .. 0.67
1     a + b, one-digit numbers, four phrasings                         0.42 .. 0.57
2     a - b (a <= 9, three phrasings); a times 10; "a + b = ?"         0.30 .. 0.46; 0.38; 0.34
3     a times b (times table); one-step story; "a minus b"             0.30; 0.17; 0.16
4     two-digit + one-digit; two-step story (bags, then some lost)     0.12; 0.00
====  ===============================================================  =======================

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


PHRASINGS = ("What is {a} {op} {b}?", "What is {a} {word} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}.")
_WORDS = {"+": "plus", "-": "minus"}


def _ask(rng: random.Random, op: str, a: tuple[int, int], b: tuple[int, int], phrasings=PHRASINGS) -> tuple[str, int]:
    """``a op b`` (op "+", "-" or "times", the numbers drawn from the inclusive ranges) in one of
    ``phrasings``."""
    x, y = rng.randint(*a), rng.randint(*b)
    value = x + y if op == "+" else x - y if op == "-" else x * y
    return rng.choice(phrasings).format(a=x, b=y, op=op, word=_WORDS.get(op, op)), value


def make_problem(rng: random.Random, level: int, for_warmup: bool = False) -> Problem:
    family = rng.randrange(3)   # levels 2-4 mix families of about the same pass rate
    if level == 0:
        text, answer = _ask(rng, "+", (1, 5), (1, 4))
    elif level == 1:
        text, answer = _ask(rng, "+", (1, 9), (1, 9))
    elif level == 2:
        text, answer = (_ask(rng, "-", (5, 9), (1, 4), (PHRASINGS[0],) + PHRASINGS[2:]),
                        _ask(rng, "times", (2, 9), (10, 10), PHRASINGS[:1]),
                        _ask(rng, "+", (1, 9), (1, 9), ("{a} {op} {b} = ?",)))[family]
    elif level == 3:
        text, answer = (_ask(rng, "times", (2, 9), (2, 9), PHRASINGS[:1]), _story_one_step(rng),
                        _ask(rng, "-", (5, 9), (1, 4), PHRASINGS[1:2]))[family]
    elif level == 4:
        text, answer = _ask(rng, "+", (11, 89), (2, 9), PHRASINGS[:1]) if family else _story_two_step(rng)
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
    chars=string.ascii_letters + string.digits + " .,?+-=",
    num_levels=NUM_LEVELS,
    warmup_level_weights=(0.35, 0.25, 0.2, 0.12, 0.08),
    make_problem=make_problem,
    corpus_solution=corpus_solution,
    split_key=split_key,
    needs_model=True,
)
