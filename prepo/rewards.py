"""Rewards: the built-in math checker, TRL-style reward functions, loading a user's, and a safe caller.

:func:`math_reward` scores completions against gold answers with math-verify (``\\boxed{}``
extraction, LaTeX and plain numbers, fractions, percentages, intervals, sets). math-verify's own
time limit uses ``signal.alarm``, which works only on a process's main thread: called from a worker
thread it raises, and wrappers that swallow the error give a silent 0 to correct answers. So the
checks run in a worker process (:mod:`prepo.verify_worker`), and the time limit is ours: the parent
waits at most ``time_limit_s`` for each answer, kills a worker that overruns (the item scores 0)
and starts a fresh one. This works from any thread or process. Verdicts are memoized: a group's G
samples often repeat the same text.

A TRL-style reward function is ``fn(prompts, completions, **columns) -> list[float]``, called by
keyword, the columns being lists (``answer`` and the data's other columns). :func:`compute_rewards` calls one
safely: an item it fails on gets 0, failures are counted and logged, the run goes on.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import RewardError
from .verify_worker import READY

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]
TIME_LIMIT_S = 5.0   # per answer; math-verify's own default
_CACHE_SIZE = 1 << 16
_STARTUP_LIMIT_S = 120.0  # importing math-verify and sympy: about 1 s, more on a loaded machine


class MathChecker:
    """math-verify verdicts from a worker process, with a per-answer time limit (seconds).
    Thread-safe (one batch at a time); a forked or spawned process starts its own worker."""

    def __init__(self, time_limit_s: float = TIME_LIMIT_S):
        self._proc: Optional[subprocess.Popen] = None
        if not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
        self.time_limit_s = time_limit_s
        self.timeouts = 0   # answers that overran the limit (scored 0)
        self._lock = threading.Lock()
        self._owner_pid = -1
        self._buf = b""
        self._cache: dict[tuple[str, str], float] = {}

    def __call__(self, completions: Sequence[str], golds: Sequence[str]) -> list[float]:
        pairs = list(zip(completions, golds))
        with self._lock:
            todo = list(dict.fromkeys(p for p in pairs if p not in self._cache))
            if todo:
                if len(self._cache) + len(todo) > _CACHE_SIZE:
                    self._cache.clear()
                self._cache.update(zip(todo, self._check(todo)))
            return [self._cache[p] for p in pairs]

    def _check(self, pairs: list[tuple[str, str]]) -> list[float]:
        out: list[float] = []
        while len(out) < len(pairs):
            pending = pairs[len(out):]
            proc = self._worker()
            try:
                proc.stdin.write(json.dumps(pending).encode() + b"\n")
                proc.stdin.flush()
            except BrokenPipeError:
                pass  # the worker is gone: reading says how
            for completion, _ in pending:
                line = self._read_line(time.monotonic() + self.time_limit_s)
                if line is None:  # overran the limit
                    self.timeouts += 1
                    log.warning("math check gave no verdict within %.1f s (scored 0); restarting the "
                                "checker. Completion starts: %r", self.time_limit_s, completion[:80])
                    self.close()
                    out.append(0.0)
                    break
                out.append(1.0 if line == b"1" else 0.0)
        return out

    def _worker(self) -> subprocess.Popen:
        if self._proc is not None and self._owner_pid == os.getpid() and self._proc.poll() is None:
            return self._proc
        if self._owner_pid == os.getpid():
            self.close()
        root = str(Path(__file__).resolve().parent.parent)  # this copy of prepo, wherever it is run
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "prepo.verify_worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, cwd=root)
        self._owner_pid, self._buf = os.getpid(), b""
        if self._read_line(time.monotonic() + _STARTUP_LIMIT_S) != READY:
            self.close()
            raise RuntimeError(f"the math-verify worker did not start within {_STARTUP_LIMIT_S:.0f} s")
        return self._proc

    def _read_line(self, deadline: float) -> Optional[bytes]:
        """The worker's next line, or None at the deadline. A worker that exits is a broken checker
        (it catches every error an input can cause), not a wrong answer: that raises."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 1 << 16)
            if not data:
                code = self._proc.wait()
                self.close()
                raise RuntimeError(f"the math-verify worker (python -m prepo.verify_worker) exited with "
                                   f"code {code}; its error is on stderr")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def close(self) -> None:
        """Stop the worker (a new one starts on the next call)."""
        proc, self._proc = self._proc, None
        if proc is not None and self._owner_pid == os.getpid():
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()

    def __del__(self):
        self.close()


_checker = MathChecker()


def _text(completion) -> str:
    """A completion's text; a conversational one (TRL: a list of messages) gives its last message."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_box_only(text: str) -> str:
    """``text`` with every ``\\boxed`` / ``\\fbox`` command before the last one removed (their
    contents stay, as plain text): with several boxes only the last is the answer."""
    last = max(text.rfind(c) for c in _BOX_COMMANDS)
    if last <= 0:
        return text
    head = text[:last]
    for command in _BOX_COMMANDS:
        head = head.replace(command, "")
    return head + text[last:]


def math_reward(completions: Sequence, answers: Sequence, **kwargs) -> list[float]:
    """1.0 for each completion whose final answer math-verify finds equal to its gold answer, else
    0.0 (also when the check overruns :data:`TIME_LIMIT_S`). Other keyword columns are ignored.

    The final answer is the last ``\\boxed{}`` (or ``\\fbox{}``) when there is one, else the last
    expression. With several boxes only the last counts, as in the MATH graders'
    ``last_boxed_only_string`` (verl, Qwen, DeepSeek): ``"\\boxed{5} and also \\boxed{7}"`` answers 7.
    math-verify alone would join boxes that sit close together or are separated by "and", "or" or a
    comma into one set answer ({5, 7}, right for no gold answer but "5, 7"); a multi-part answer
    belongs in one box, ``\\boxed{5, 7}``."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return _checker([last_box_only(_text(c)) for c in completions], [str(a) for a in answers])


def math_verify_reward(prompts: Sequence, completions: Sequence, answer: Sequence, **columns) -> list[float]:
    """The built-in reward with TRL's signature: :func:`math_reward` against the ``answer`` column."""
    return math_reward(completions, answer)


def load_reward(spec: str) -> RewardFn:
    """The function named by ``spec``, ``module:function`` (an importable module) or
    ``path/to/file.py:function``, with TRL's signature ``fn(prompts, completions, **columns)``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardError(f"--reward expects module:function or path/to/file.py:function, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"--reward {spec!r}: file {target!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"prepo_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise RewardError(f"--reward {spec!r}: no module named {target!r} (is it on PYTHONPATH?)") from None
            raise
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"--reward {spec!r}: module {target!r} has no attribute {name!r}")
    if not callable(fn):
        raise RewardError(f"--reward {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_fn(cfg: "TrainConfig") -> RewardFn:
    """The run's reward: ``--reward module:function``, else the built-in task's own checker when it
    has one (Countdown) and its problems are the data, else the math checker (math-verify against
    the ``answer`` column: the built-in arithmetic answers are integers, a math data set's are
    LaTeX / numbers)."""
    from .tasks import get_task

    if cfg.reward:
        return load_reward(cfg.reward)
    task_reward = get_task(cfg.task).reward
    return task_reward if task_reward is not None and not cfg.train_data else math_verify_reward


def compute_rewards(fn: RewardFn, prompts: Sequence, completions: Sequence[str], **columns) -> tuple[list[float], int]:
    """(rewards, number of items whose reward could not be computed). Calls ``fn`` as TRL does, by
    keyword (``fn(prompts=..., completions=..., **columns)``, so ``def f(completions, answer,
    **kwargs)`` works), on the whole batch; if it raises or returns something unusable, calls it item by item and gives 0 to each
    item that raises (or returns None / a non-number)."""
    n = len(completions)
    try:
        values = list(fn(prompts=prompts, completions=completions, **columns))
        if len(values) == n and all(_is_number(v) for v in values):
            return [float(v) for v in values], 0
        log.warning("reward function returned %d values (need %d numbers); scoring item by item", len(values), n)
    except Exception as exc:  # noqa: BLE001 -- a user reward function may raise anything
        log.warning("reward function raised %s: %s; scoring item by item", type(exc).__name__, exc)
    rewards, failures = [], 0
    for i in range(n):
        item_cols = {k: [v[i]] for k, v in columns.items()}
        try:
            value = list(fn(prompts=[prompts[i]], completions=[completions[i]], **item_cols))
            if len(value) != 1 or not _is_number(value[0]):
                raise ValueError(f"returned {value!r}")
            rewards.append(float(value[0]))
        except Exception as exc:  # noqa: BLE001
            failures += 1
            rewards.append(0.0)
            log.debug("reward failed on item %d: %s", i, exc)
    return rewards, failures


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
