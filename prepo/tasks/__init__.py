"""The built-in verifiable tasks (testbeds) for CPU runs, by name (``--task``):

* ``arithmetic`` (default, testbed 1): integer arithmetic with worked solutions; rarer levels are
  both less familiar and harder (:mod:`prepo.tasks.arithmetic`);
* ``phrasing`` (testbed 2): the same problems in four phrasings whose familiarity is independent
  of difficulty (:mod:`prepo.tasks.phrasing`);
* ``countdown`` (testbed 3): reach a target with + - * /, many right answers
  (:mod:`prepo.tasks.countdown`);
* ``wordmath``: arithmetic and short word problems in English for a real pretrained chat model
  (``--model smollm2-135m-instruct --chat-template``; :mod:`prepo.tasks.wordmath`).

The shared parts (problems, held-out split, the task interface) are in :mod:`prepo.tasks.base`.
"""
from __future__ import annotations

from . import arithmetic, countdown, phrasing, wordmath
from .base import BuiltinTask, Problem, Prompt, is_heldout, prompt_key

TASKS: dict[str, BuiltinTask] = {t.name: t for t in (arithmetic.TASK, phrasing.TASK, countdown.TASK, wordmath.TASK)}


def get_task(name: str) -> BuiltinTask:
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["BuiltinTask", "Problem", "Prompt", "TASKS", "get_task", "is_heldout", "prompt_key"]
