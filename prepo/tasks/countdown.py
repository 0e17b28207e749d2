"""Testbed 3: Countdown -- reach a target from given numbers with + - * /, many right answers.

A prompt lists single-digit numbers and a target: ``"3,7,9:30="``. A completion is a chain of steps
``"a op b=c"`` joined by commas (``"7*3=21,21+9=30"``); it is right when every step is exact
arithmetic, uses numbers still available (each given number and each intermediate result at most
once), and the last step's result is the target. Numbers need not all be used, and most targets
can be reached in several ways (``"9+7=16,16+3=19"`` ... ``"3*9=27,27+7=34"``), so there is real
exploration: token entropy sits in the choice of pair, order and operator all along the solution,
not in a few arithmetic slips.

Problems are made by a random forward path over all the numbers (subtraction only when the result
stays positive, division only when exact, intermediate results at most :data:`MAX_VALUE`); the
target is where the path ends and the warm-up corpus shows that path as the worked solution. The
level fixes how many numbers there are and which operators occur.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Optional, Sequence

from .base import BuiltinTask, Problem

# level -> (how many numbers, operator alphabet)
LEVELS: tuple[tuple[int, str], ...] = (
    (2, "+-*"),     # 0: one step
    (3, "+-"),      # 1
    (3, "+-*/"),    # 2
    (4, "+-*/"),    # 3
)
MAX_VALUE = 200
CHARS = "0123456789+-*/=,:"
_STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def _apply(a: int, op: str, b: int) -> Optional[int]:
    """``a op b`` when the step is allowed (positive, exact, <= MAX_VALUE), else None."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    else:
        c = a // b if b > 1 and a % b == 0 else None
    return c if c is not None and 0 < c <= MAX_VALUE else None


def random_path(rng: random.Random, numbers: Sequence[int], ops: str) -> Optional[list[tuple[int, str, int, int]]]:
    """A random chain of steps ``(a, op, b, c)`` that combines all ``numbers`` into one; None
    when a drawn step is not allowed (the caller draws again)."""
    pool = list(numbers)
    steps = []
    while len(pool) > 1:
        a, b = rng.sample(pool, 2)
        op = rng.choice(ops)
        c = _apply(a, op, b)
        if c is None:
            return None
        pool.remove(a)
        pool.remove(b)
        pool.append(c)
        steps.append((a, op, b, c))
    return steps


def format_steps(steps: Sequence[tuple[int, str, int, int]]) -> str:
    return ",".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """``"3,7,9:30="`` -> ``([3, 7, 9], 30)``; ValueError when it is not a Countdown prompt."""
    m = re.fullmatch(r"(\d+(?:,\d+)*):(\d+)=", prompt)
    if not m:
        raise ValueError(f"not a Countdown prompt: {prompt!r}")
    return [int(x) for x in m.group(1).split(",")], int(m.group(2))


def make_problem(rng: random.Random, level: int, for_warmup: bool = False) -> Problem:
    """One problem of ``level`` (the warm-up and the RL pool draw alike); the generating path is
    kept as the ``solution`` column (the warm-up's worked solution; rewards ignore it)."""
    n, ops = LEVELS[level]
    while True:
        numbers = [rng.randint(1, 9) for _ in range(n)]
        steps = random_path(rng, numbers, ops)
        if steps is not None and steps[-1][3] not in numbers:
            target = steps[-1][3]
            prompt = ",".join(map(str, numbers)) + f":{target}="
            return Problem(prompt=prompt, answer=str(target), difficulty=level,
                           columns={"solution": format_steps(steps)})


def corpus_solution(problem: Problem, rng: random.Random, slip_rate: float) -> str:
    """The problem's generating path, each step's result off by 1 to 3 with probability
    ``slip_rate``; later steps use the slipped value in place of the true one (matched by value, so
    an equal given number may be the one replaced: noise either way), and the chain misses."""
    steps = [(int(a), op, int(b)) for a, op, b, _ in _STEP.findall(problem.columns["solution"])]
    out, renamed = [], {}
    for a, op, b in steps:
        a, b = renamed.pop(a, a), renamed.pop(b, b)
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        true_c = c
        if slip_rate > 0 and rng.random() < slip_rate:
            c = max(1, c + rng.choice((-3, -2, -1, 1, 2, 3)))
        out.append((a, op, b, c))
        renamed[true_c] = c
    return format_steps(out)


def check(prompt: str, completion: str) -> bool:
    """Whether ``completion`` solves the Countdown ``prompt`` (see the module docstring)."""
    numbers, target = parse_prompt(prompt)
    pool = Counter(numbers)
    parts = completion.strip().split(",")
    result = None
    for part in parts:
        m = _STEP.fullmatch(part.strip())
        if not m:
            return False
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        pool[a] -= 1
        pool[b] -= 1
        if pool[a] < 0 or pool[b] < 0 or _apply(a, op, b) != c:
            return False
        pool[c] += 1
        result = c
    return result == target


def countdown_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """TRL-style reward: 1.0 for a right Countdown solution, else 0.0."""
    return [float(check(p, c)) for p, c in zip(prompts, completions)]


TASK = BuiltinTask(
    name="countdown", chars=CHARS, num_levels=len(LEVELS),
    warmup_level_weights=(0.2, 0.3, 0.3, 0.2),
    make_problem=make_problem, corpus_solution=corpus_solution, reward=countdown_reward,
)
