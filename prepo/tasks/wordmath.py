"""``wordmath``: arithmetic and short word problems in natural language, for a real pretrained chat
model (SmolLM2-135M-Instruct and up), not for the character-level toy.

A prompt is plain English text, asked with the model's chat template (run with ``--chat-template``)
and answered in free text; the reward is math-verify on the completion's final number
(:func:`prepo.rewards.math_reward`), so "7 + 5 = 12. The answer is 12." scores 1.

A level (0 = easiest) fixes the arithmetic; the wording is drawn independently of it, uniformly
from five phrasings ("What is 4 + 3?", "What is 4 plus 3?", "Calculate 4 + 3.", "Compute 4 + 3.",
"4 + 3 = ?") and a story ("Anna has 4 apples. Ben gives Anna 3 more apples. How many apples does
Anna have now?"), so a prompt's length and phrasing say nothing about its level (the problem's
``form`` column names its wording). The levels are ordered by SmolLM2-135M-Instruct's pass rate
(8 samples at temperature 0.7, "Answer with the number only.", 32 new tokens), as measured on 200
training prompts in ``benchmarks/results/smollm2_wordmath_base.md``, except levels 2 and 3: they
measured 0.29 and 0.35 (41 and 43 prompts; about 1.2 standard errors apart, the per-prompt pass
rates spreading with SD 0.24) and keep the arithmetic's order:

====  =================================================  ================
level arithmetic                                         base pass rate
====  =================================================  ================
0     a + b, sums up to 9                                0.52 (35 prompts)
1     a + b, one-digit numbers                           0.38 (41)
2     a - b (a <= 9); a times 10                         0.29 (41)
3     a times b (times table)                            0.35 (43)
4     two-digit + one-digit; a times b minus c           0.07 (40)
====  =================================================  ================

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


# An expression: its first number, then (operator, number) steps; operators "+", "-", "*".
_SYMBOL = {"+": "+", "-": "-", "*": "*"}
_WORD = {"+": "plus", "-": "minus", "*": "times"}
PHRASINGS = ("What is {e}?", "What is {w}?", "Calculate {e}.", "Compute {e}.", "{e} = ?")
FORMS = PHRASINGS + ("story",)   # a problem's wording, drawn uniformly at every level


def _written(first: int, steps, names: dict) -> str:
    return " ".join([str(first)] + [f"{names[op]} {n}" for op, n in steps])


def _story(first: int, steps) -> str:
    """The expression told as a story about someone and their things. The names and things are
    drawn from the numbers: one story per expression, as one prompt per phrasing, so drawing
    distinct prompts does not favour stories on a level with few expressions (level 0 has 20)."""
    rng = random.Random(repr((first, steps)))
    name, friend = rng.sample(NAMES, 2)
    item, he = rng.choice(ITEMS), _PRONOUN[name]
    ops = [op for op, _ in steps]
    if ops == ["+"]:
        return (f"{name} has {first} {item}. {friend} gives {name} {steps[0][1]} more {item}. "
                f"How many {item} does {name} have now?")
    if ops == ["-"]:
        return (f"{name} has {first} {item}. {he} gives {steps[0][1]} {item} to {friend}. "
                f"How many {item} does {name} have left?")
    bags = f"{name} buys {first} bags with {steps[0][1]} {item} in each bag"
    if ops == ["*"]:
        return f"{bags}. How many {item} does {name} have?"
    if ops == ["*", "-"]:
        return f"{bags}, then loses {steps[1][1]} {item}. How many {item} does {name} have?"
    raise ValueError(f"no story for the operators {ops}")


def _value(first: int, steps) -> int:
    """Left to right, ``*`` before ``-`` (the only mix the levels use puts it first)."""
    value = first
    for op, n in steps:
        value = value + n if op == "+" else value - n if op == "-" else value * n
    return value


def _arithmetic(rng: random.Random, level: int) -> tuple[int, list]:
    """The numbers and operators of a ``level`` problem: what makes it hard, whatever its wording."""
    r = rng.randint
    if level == 0:
        return r(1, 5), [("+", r(1, 4))]
    if level == 1:
        return r(1, 9), [("+", r(1, 9))]
    if level == 2:
        return (r(5, 9), [("-", r(1, 4))]) if rng.random() < 2 / 3 else (r(2, 9), [("*", 10)])
    if level == 3:
        return r(2, 9), [("*", r(2, 9))]
    if level == 4:
        if rng.random() < 0.5:
            return r(11, 89), [("+", r(2, 9))]
        bags, per_bag = r(2, 5), r(2, 9)
        return bags, [("*", per_bag), ("-", r(1, bags * per_bag - 1))]
    raise ValueError(f"level must be in 0..{NUM_LEVELS - 1}, got {level}")


def make_problem(rng: random.Random, level: int, for_warmup: bool = False) -> Problem:
    """A ``level`` problem (its arithmetic) in a wording drawn independently of the level."""
    first, steps = _arithmetic(rng, level)
    form = rng.choice(FORMS)
    if form == "story":
        text = _story(first, steps)
    else:
        text = form.format(e=_written(first, steps, _SYMBOL), w=_written(first, steps, _WORD))
    return Problem(text, str(_value(first, steps)), difficulty=level, columns={"form": form})


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
    chars=string.ascii_letters + string.digits + " .,?+-*=",
    num_levels=NUM_LEVELS,
    warmup_level_weights=(0.35, 0.25, 0.2, 0.12, 0.08),
    make_problem=make_problem,
    corpus_solution=corpus_solution,
    split_key=split_key,
    needs_model=True,
)
