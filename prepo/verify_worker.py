"""The math-verify checker, run as a worker process by :class:`prepo.rewards.MathChecker`.

Protocol (stdin/stdout, UTF-8): the parent writes one JSON line, a list of ``[completion, gold]``
pairs; the worker answers one line per pair, ``1`` or ``0``, flushed as each is decided, so the
parent can put a time limit on each answer (the worker first writes ``ready`` once its imports are
done) and kill the worker when one hangs. The worker exits
when its stdin closes (the parent exited or let it go).

math-verify's own time limits are turned off here (``parsing_timeout=None``,
``timeout_seconds=None``): they use ``signal.alarm``, which only works on a main thread.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

READY = b"ready"  # the first line, once the imports are done: time limits start after it


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    """A gold answer is LaTeX without delimiters (``[1,2)``, ``\\sqrt{2}``, ``\\frac{1}{2}``);
    math-verify only reads those forms inside ``\\boxed{}`` or ``$...$`` (bare, ``[1,2)`` parses
    to nothing and ``2\\sqrt{3}`` to 2), so it is boxed unless it holds a ``\\boxed`` already."""
    from math_verify import parse

    return parse(gold if "\\boxed" in gold else "\\boxed{" + gold + "}", parsing_timeout=None)


def check(completion: str, gold: str) -> float:
    """1.0 when math-verify finds the completion's final answer (``\\boxed{}`` first, else the
    last LaTeX or plain expression) equal to ``gold``, else 0.0. No time limit: see the module doc."""
    from math_verify import parse, verify

    try:
        pred = parse(completion, parsing_timeout=None)
        gold_parsed = _parse_gold(gold) if pred else None
        return 1.0 if gold_parsed and verify(gold_parsed, pred, timeout_seconds=None) else 0.0
    except Exception:  # noqa: BLE001 -- sympy can raise anything on odd input; that is a wrong answer
        return 0.0


def main() -> None:
    import math_verify  # noqa: F401 -- imported (about 1 s) before saying ready

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout disabled" warning
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(READY + b"\n")
    stdout.flush()
    for line in iter(stdin.readline, b""):
        for completion, gold in json.loads(line):
            stdout.write(b"1\n" if check(completion, gold) else b"0\n")
            stdout.flush()


if __name__ == "__main__":
    main()
