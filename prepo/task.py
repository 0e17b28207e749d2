"""The built-in verifiable task: integer arithmetic with graded difficulty.

A problem is a prompt such as ``"12+7*3="`` whose answer is the integer value of the expression
(usual precedence: ``*`` before ``+``/``-``). Difficulty grows with the level (operand count,
digit counts, operators) and, within a level, with the number of carries of the additions.

Splits are disjoint by construction: a problem belongs to the held-out split iff a hash of its
prompt text falls in the held-out bucket, so no generation order or seed can leak an evaluation
problem into training. Everything is deterministic given the seed.

Problems can also be read from a JSONL file (one ``{"prompt": ..., "answer": ...}`` object a line,
optional ``"difficulty"``) through :func:`load_problems_jsonl`, which validates its input.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

# level -> (operand digit counts, operator alphabet). Graded: more operands, more digits, '*'.
LEVELS: tuple[tuple[tuple[int, ...], str], ...] = (
    ((1, 1), "+"),          # 0: 3+4=
    ((2, 1), "+-"),         # 1: 23+4=, 23-4=
    ((2, 2), "+-"),         # 2: 23+48=
    ((1, 1, 1), "+*"),      # 3: 3+4*5=
    ((2, 1, 1), "+-*"),     # 4: 23-4*5=
)
NUM_LEVELS = len(LEVELS)
CHARS = "0123456789+-*="


class DataError(ValueError):
    """Problem data that cannot be used (bad file, missing field, wrong answer type...)."""


@dataclass(frozen=True)
class Problem:
    prompt: str          # e.g. "12+7*3="
    answer: str          # e.g. "33" (canonical integer string)
    difficulty: int      # level, 0 = easiest
    carries: int = 0     # carries in the additions (finer difficulty grade)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_expression(expr: str) -> int:
    """Integer value of ``a op b op c`` with ``*`` binding tighter than ``+``/``-``.
    Written out (no ``eval``) so the task's ground truth is independent code."""
    tokens: list[str] = []
    num = ""
    for ch in expr:
        if ch.isdigit():
            num += ch
        elif ch in "+-*":
            if not num:
                raise ValueError(f"malformed expression {expr!r}")
            tokens += [num, ch]
            num = ""
        else:
            raise ValueError(f"unexpected character {ch!r} in {expr!r}")
    if not num:
        raise ValueError(f"malformed expression {expr!r}")
    tokens.append(num)
    # fold multiplications first
    terms: list[int] = [int(tokens[0])]
    ops: list[str] = []
    for op, val in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1] *= int(val)
        else:
            ops.append(op)
            terms.append(int(val))
    total = terms[0]
    for op, t in zip(ops, terms[1:]):
        total = total + t if op == "+" else total - t
    return total


def count_carries(a: int, b: int) -> int:
    carries, carry = 0, 0
    while a or b:
        s = a % 10 + b % 10 + carry
        carry = 1 if s >= 10 else 0
        carries += carry
        a //= 10
        b //= 10
    return carries


def is_heldout(prompt: str, heldout_frac: float = 0.15) -> bool:
    h = int.from_bytes(hashlib.sha1(prompt.encode()).digest()[:8], "big")
    return (h % 10_000) < int(heldout_frac * 10_000)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def make_problem(rng: random.Random, level: int) -> Problem:
    digits, alphabet = LEVELS[level]
    vals = [_operand(rng, d) for d in digits]
    ops = [rng.choice(alphabet) for _ in range(len(vals) - 1)]
    if len(vals) == 2 and ops[0] == "-" and vals[1] > vals[0]:
        vals[0], vals[1] = vals[1], vals[0]
    expr = str(vals[0]) + "".join(o + str(v) for o, v in zip(ops, vals[1:]))
    carries = sum(count_carries(vals[i], vals[i + 1]) for i, o in enumerate(ops) if o == "+")
    return Problem(prompt=expr + "=", answer=str(evaluate_expression(expr)), difficulty=level, carries=carries)


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


def load_problems_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file; raises :class:`DataError` naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"problem file {str(path)!r} does not exist")
    problems: list[Problem] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key in ("prompt", "answer"):
                if key not in obj:
                    raise DataError(f"{path}:{lineno}: missing field {key!r}")
            prompt, answer = obj["prompt"], obj["answer"]
            if not isinstance(prompt, str) or not prompt:
                raise DataError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
            if isinstance(answer, bool) or not isinstance(answer, (str, int)):
                raise DataError(f"{path}:{lineno}: 'answer' must be a string or an integer")
            bad = sorted(set(prompt) - set(CHARS))
            if bad:
                raise DataError(f"{path}:{lineno}: prompt has characters outside the task alphabet {CHARS!r}: {bad}")
            diff = obj.get("difficulty", 0)
            if isinstance(diff, bool) or not isinstance(diff, int):
                raise DataError(f"{path}:{lineno}: 'difficulty' must be an integer")
            problems.append(Problem(prompt=prompt, answer=str(answer), difficulty=diff))
    if not problems:
        raise DataError(f"problem file {str(path)!r} holds no problems")
    return problems


def save_problems_jsonl(problems: Sequence[Problem], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict()) + "\n")
