"""Testbed 1, the default built-in task: integer arithmetic with worked solutions and graded difficulty.

A problem is a prompt such as ``"3+4*5-2="`` whose answer is the integer value of the expression
(usual precedence: ``*`` before ``+``/``-``). Operands are single digits; the level fixes how many
there are and which operators occur, so harder levels need more steps (1 to 4).

A completion is a worked solution, one step per binary operation, multiplications first, then
additions and subtractions left to right, steps separated by commas; its last number is the
answer: ``"4*5=20,3+20=23,23-2=21"``. The reward checks only that final number (math-verify), so
RL is free to change how the model gets there. Steps are facts shared across problems ("4*5=20"),
which is what lets what RL sharpens on training prompts carry over to held-out ones.

"""
from __future__ import annotations

import random
from typing import Optional

from .base import BuiltinTask, Problem

# level -> (number of single-digit operands, operator alphabet): 1, 2, 2, 3, 4 solution steps.
LEVELS: tuple[tuple[int, str], ...] = (
    (2, "+"),       # 0: 3+4=
    (3, "+-"),      # 1: 3+4-2=
    (3, "+-*"),     # 2: 3+4*5=
    (4, "+-*"),     # 3: 3*4-5+6=
    (5, "+-*"),     # 4: 3+4*5-6*7=
)
NUM_LEVELS = len(LEVELS)
CHARS = "0123456789+-*=,"
STEP_SEP = ","


def _tokens(expr: str) -> list:
    """``"3+4*5"`` -> ``[3, "+", 4, "*", 5]``; raises ValueError on anything else."""
    out: list = []
    num = ""
    for ch in expr:
        if ch.isdigit():
            num += ch
        elif ch in "+-*":
            if not num:
                raise ValueError(f"malformed expression {expr!r}")
            out += [int(num), ch]
            num = ""
        else:
            raise ValueError(f"unexpected character {ch!r} in {expr!r}")
    if not num:
        raise ValueError(f"malformed expression {expr!r}")
    return out + [int(num)]


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def worked_solution(expr: str, rng: Optional[random.Random] = None, slip_rate: float = 0.0,
                    swap_rate: float = 0.0) -> str:
    """The step-by-step solution of ``expr`` (without the trailing ``=``): multiplications left to
    right, then additions and subtractions left to right, ``"a op b=c"`` steps joined by commas.

    With ``slip_rate > 0`` each step's result is, with that probability, off by 1 to 3 (drawn
    from ``rng``), and later steps carry the slip on: a noisy corpus, like worked solutions
    written by people. The warm-up trains on such a corpus; RL with a verifier can unlearn it.
    With ``swap_rate > 0`` the operands of each ``+`` / ``*`` step are, with that probability,
    written in the other order (``"5*4=20"``): harmless variety in how a solution is written."""
    toks = _tokens(expr)
    steps: list[str] = []

    def step(a: int, op: str, b: int) -> int:
        c = _apply(a, op, b)
        if slip_rate > 0 and rng is not None and rng.random() < slip_rate:
            c += rng.choice((-3, -2, -1, 1, 2, 3))
        if swap_rate > 0 and op in "+*" and rng is not None and rng.random() < swap_rate:
            a, b = b, a
        steps.append(f"{a}{op}{b}={c}")
        return c

    terms, ops = [toks[0]], []
    for op, val in zip(toks[1::2], toks[2::2]):
        if op == "*":
            terms[-1] = step(terms[-1], "*", val)
        else:
            ops.append(op)
            terms.append(val)
    total = terms[0]
    for op, t in zip(ops, terms[1:]):
        total = step(total, op, t)
    return STEP_SEP.join(steps) if steps else str(total)


def evaluate_expression(expr: str) -> int:
    """Integer value of ``expr`` with ``*`` binding tighter than ``+``/``-``: the last number of
    its exact worked solution. Written out (no ``eval``) so the ground truth is the task's own code."""
    return int(worked_solution(expr).rsplit("=", 1)[-1])


def random_expression(rng: random.Random, level: int) -> str:
    """An expression of ``level`` without the ``=``: ``"3+4*5"``."""
    n_operands, alphabet = LEVELS[level]
    vals = [rng.randint(0, 9) for _ in range(n_operands)]
    ops = [rng.choice(alphabet) for _ in range(n_operands - 1)]
    return str(vals[0]) + "".join(o + str(v) for o, v in zip(ops, vals[1:]))


def make_problem(rng: random.Random, level: int, for_warmup: bool = False) -> Problem:
    """One problem of ``level``; the warm-up and the RL pool draw alike."""
    expr = random_expression(rng, level)
    return Problem(prompt=expr + "=", answer=str(evaluate_expression(expr)), difficulty=level)


def corpus_solution(problem: Problem, rng: random.Random, slip_rate: float) -> str:
    return worked_solution(problem.prompt[:-1], rng, slip_rate)


TASK = BuiltinTask(
    name="arithmetic", chars=CHARS, num_levels=NUM_LEVELS,
    # many easy problems, few hard ones: rarer levels are both less familiar and harder
    warmup_level_weights=(0.35, 0.25, 0.2, 0.12, 0.08),
    make_problem=make_problem, corpus_solution=corpus_solution,
)
