"""The built-in verifiable task: integer arithmetic with worked solutions and graded difficulty.

A problem is a prompt such as ``"3+4*5-2="`` whose answer is the integer value of the expression
(usual precedence: ``*`` before ``+``/``-``). Operands are single digits; the level fixes how many
there are and which operators occur, so harder levels need more steps (1 to 4).

A completion is a worked solution, one step per binary operation, multiplications first, then
additions and subtractions left to right, steps separated by commas; its last number is the
answer: ``"4*5=20,3+20=23,23-2=21"``. The reward checks only that final number (math-verify), so
RL is free to change how the model gets there. Steps are facts shared across problems ("4*5=20"),
which is what lets what RL sharpens on training prompts carry over to held-out ones.

Splits are disjoint by construction: a problem belongs to the held-out split iff a hash of its
prompt text falls in the held-out bucket, so no generation order or seed can leak an evaluation
problem into training. Everything is deterministic given the seed.

Problems from files (jsonl, json, parquet, ``datasets`` directories; verl and TRL layouts) are read
by :func:`prepo.data.load_examples`; :func:`check_task_alphabet` says whether the built-in model can
read them.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

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


class DataError(ValueError):
    """Problem data that cannot be used (bad file, missing field, wrong answer type...)."""


# A prompt is plain text or a chat: a list of {"role": ..., "content": ...} messages.
Prompt = Union[str, list]


@dataclass(frozen=True)
class Problem:
    prompt: Prompt                   # e.g. "2+7*3=", or [{"role": "user", "content": "..."}]
    answer: str                      # e.g. "23" (the gold answer as text)
    difficulty: Optional[int] = None  # level, 0 = easiest; None when the data has none
    # The row's other columns (verl: data_source, extra_info, reward_model...), passed to a
    # TRL-style reward function as keyword lists. Not part of equality.
    columns: dict = field(default_factory=dict, compare=False)


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


def worked_solution(expr: str, rng: Optional[random.Random] = None, slip_rate: float = 0.0) -> str:
    """The step-by-step solution of ``expr`` (without the trailing ``=``): multiplications left to
    right, then additions and subtractions left to right, ``"a op b=c"`` steps joined by commas.

    With ``slip_rate > 0`` each step's result is, with that probability, off by 1 to 3 (drawn
    from ``rng``), and later steps carry the slip on: a noisy corpus, like worked solutions
    written by people. The warm-up trains on such a corpus; RL with a verifier can unlearn it."""
    toks = _tokens(expr)
    steps: list[str] = []

    def step(a: int, op: str, b: int) -> int:
        c = _apply(a, op, b)
        if slip_rate > 0 and rng is not None and rng.random() < slip_rate:
            c += rng.choice((-3, -2, -1, 1, 2, 3))
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


def is_heldout(prompt: str, heldout_frac: float = 0.15) -> bool:
    h = int.from_bytes(hashlib.sha1(prompt.encode()).digest()[:8], "big")
    return (h % 10_000) < int(heldout_frac * 10_000)


def make_problem(rng: random.Random, level: int) -> Problem:
    n_operands, alphabet = LEVELS[level]
    vals = [rng.randint(0, 9) for _ in range(n_operands)]
    ops = [rng.choice(alphabet) for _ in range(n_operands - 1)]
    expr = str(vals[0]) + "".join(o + str(v) for o, v in zip(ops, vals[1:]))
    return Problem(prompt=expr + "=", answer=str(evaluate_expression(expr)), difficulty=level)


def generate_problems(
    n: int,
    seed: int,
    split: str = "train",
    level_weights: Sequence[float] | None = None,
    heldout_frac: float = 0.15,
    unique: bool = True,
) -> list[Problem]:
    """``n`` problems of ``split`` ("train" or "eval"), levels drawn with ``level_weights``
    (default uniform). Deterministic given the arguments. With ``unique`` no prompt repeats;
    if a level's space is exhausted the remaining draws go to other levels."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    weights = list(level_weights) if level_weights is not None else [1.0] * NUM_LEVELS
    if len(weights) != NUM_LEVELS or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"level_weights must be {NUM_LEVELS} non-negative numbers with a positive sum")
    rng = random.Random(f"{seed}-{split}")
    want_heldout = split == "eval"
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise DataError(f"could not generate {n} distinct {split} problems (got {len(out)})")
        level = rng.choices(range(NUM_LEVELS), weights=weights)[0]
        p = make_problem(rng, level)
        if is_heldout(p.prompt, heldout_frac) != want_heldout:
            continue
        if unique:
            if p.prompt in seen:
                continue
            seen.add(p.prompt)
        out.append(p)
    return out


def balanced_problems(n_per_level: int, seed: int, split: str, heldout_frac: float = 0.15) -> list[Problem]:
    """``n_per_level`` distinct problems of each level (fewer if a level's split is smaller)."""
    out: list[Problem] = []
    for level in range(NUM_LEVELS):
        w = [0.0] * NUM_LEVELS
        w[level] = 1.0
        rng = random.Random(f"{seed}-{split}-L{level}")
        seen: set[str] = set()
        tries = 0
        while len([p for p in out if p.difficulty == level]) < n_per_level and tries < 50 * n_per_level + 2000:
            tries += 1
            p = make_problem(rng, level)
            if is_heldout(p.prompt, heldout_frac) != (split == "eval") or p.prompt in seen:
                continue
            seen.add(p.prompt)
            out.append(p)
    return out


def check_task_alphabet(problems: Sequence[Problem], source: str) -> None:
    """Raise :class:`DataError` unless every prompt is text in this task's alphabet: the built-in
    model's character tokenizer reads nothing else (other data needs ``--model``)."""
    for p in problems:
        bad = sorted(set(p.prompt) - set(CHARS)) if isinstance(p.prompt, str) else ["<chat prompt>"]
        if bad:
            raise DataError(f"{source}: prompt {p.prompt!r} has characters outside the built-in task's alphabet "
                            f"{CHARS!r}: {bad}; the built-in model reads only that alphabet, name a model "
                            "with --model for other data")
