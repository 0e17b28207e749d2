"""Reads a finished run directory (the trainer's ``metrics.jsonl`` as typed
:class:`~prepo.metrics.StepMetrics`, ``eval.jsonl``, ``selection.jsonl``, ``initial.json``,
``summary.json``) into :class:`RunData`, from the runs directory or from the copy of those small
files that :func:`export_run` puts in the repository (what a fresh clone has)."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from prepo.metrics import StepMetrics
from prepo.report import read_jsonl

from .config import ROOT, run_dir_of


@dataclass
class RunData:
    """One (strategy, seed) run as the statistics need it."""

    strategy: str
    seed: int
    curve: list[tuple[int, float]]   # [(cumulative rollouts, accuracy in 0..1)], the step-0 point first when known
    metrics: list[StepMetrics] = field(default_factory=list)   # the trainer's step records
    initial: dict = field(default_factory=dict)   # initial.json: the base policy's Spearman diagnostic, eval
    summary: dict = field(default_factory=dict)   # summary.json
    greedy_final: Optional[float] = None          # greedy eval_accuracy at the last evaluation
    levels_initial: dict = field(default_factory=dict)  # {level: greedy accuracy} at step 0
    levels_final: dict = field(default_factory=dict)    # ... at the last evaluation
    selection: list[dict] = field(default_factory=list)  # selection.jsonl: the prompts each step rolled out

    @property
    def initial_acc(self) -> Optional[float]:
        """Accuracy before training (the step-0 point), None when not logged."""
        return self.curve[0][1] if self.curve and self.curve[0][0] == 0 else None

    @property
    def total_rollouts(self) -> int:
        """The run's rollout budget: every rollout generated over the run."""
        return int(self.metrics[-1].rollouts) if self.metrics else int(self.curve[-1][0])


def _levels(evaluation: Optional[dict]) -> dict[int, float]:
    """{level: accuracy} from an eval.jsonl record's ``accuracy_level<L>`` keys."""
    prefix = "accuracy_level"
    return {int(k[len(prefix):]): float(v) for k, v in (evaluation or {}).items() if k.startswith(prefix)}


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} when the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else {}


def load_run(run_dir: Path, strategy: str, seed: int, metric: str) -> RunData:
    """The run in ``run_dir``. Its curve is the ``metric`` (an eval key such as ``eval_avg@8``) of
    the step records that have it, preceded by the step-0 evaluation from eval.jsonl (or
    initial.json). FileNotFoundError / ValueError when the run has no records / no such metric."""
    metrics = [StepMetrics.from_dict(row) for row in read_jsonl(run_dir / "metrics.jsonl")]
    if not metrics:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty")
    twice = sorted(k for k, n in Counter(m.step for m in metrics).items() if n > 1)
    if twice:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: steps {twice} appear more than once (two trainers "
                         "wrote this run?); the curve would count them twice")
    initial = _read_json(run_dir / "initial.json")
    evals = read_jsonl(run_dir / "eval.jsonl")
    step0 = next((e for e in evals if e.get("step") == 0), None) or initial.get("eval")
    eval_key = metric.removeprefix("eval_")   # eval.jsonl names it without the prefix
    curve = [(0, float(step0[eval_key]))] if step0 is not None and step0.get(eval_key) is not None else []
    curve += [(int(m.rollouts), float(m.eval[metric])) for m in metrics if (m.eval or {}).get(metric) is not None]
    if not curve:
        raise ValueError(f"{run_dir}: no {metric!r} values in metrics.jsonl (is eval_avg_k set?)")
    greedy = [m.eval["eval_accuracy"] for m in metrics if (m.eval or {}).get("eval_accuracy") is not None]
    return RunData(strategy, seed, curve, metrics, initial, _read_json(run_dir / "summary.json"),
                   greedy[-1] if greedy else None, _levels(step0), _levels(evals[-1] if evals else None),
                   read_jsonl(run_dir / "selection.jsonl"))


# a finished run's small files: the raw data of the report (never the checkpoints); summary.json,
# written last by the trainer, is copied last too, so a half-copied run never counts as finished
EXPORT_FILES = ("config.yaml", "initial.json", "eval.jsonl", "metrics.jsonl", "selection.jsonl", "summary.json")


def is_finished(run_dir: Path, total_steps: Optional[int] = None) -> bool:
    """Whether ``run_dir`` holds a finished run: a summary.json covering ``total_steps`` steps
    (any number when None)."""
    summary = _read_json(Path(run_dir) / "summary.json")
    return bool(summary) and (total_steps is None or summary.get("steps") == total_steps)


def export_run(run_dir: Path, dest: Path, root: Path = ROOT) -> None:
    """Copy a finished run's EXPORT_FILES (those present, all text) from ``run_dir`` into ``dest``, each
    written to a temporary name and renamed, summary.json last. Paths under ``root`` (the repository)
    are written relative to it, so that the committed copy reads the same on every machine."""
    dest.mkdir(parents=True, exist_ok=True)
    prefix = f"{Path(root).resolve()}{os.sep}"
    for name in EXPORT_FILES:
        if (run_dir / name).exists():
            text = (run_dir / name).read_text().replace(prefix, "")
            (dest / f".{name}.tmp").write_text(text)
            os.replace(dest / f".{name}.tmp", dest / name)


def load_runs(places: Sequence[Path], strategies: Sequence[str], seeds: Sequence[int], metric: str,
              total_steps: Optional[int] = None) -> tuple[dict, list[str]]:
    """({strategy: {seed: RunData}}, missing): each (strategy, seed) from the first of ``places``
    (runs directories, e.g. the runs and their exported copy) where it is finished (see
    :func:`is_finished`); ``missing`` says why each other run is not there ('<strategy>/seed<k>: ...')."""
    runs: dict = {}
    missing = []
    for s in strategies:
        for k in seeds:
            found = next((run_dir_of(p, s, k) for p in places if is_finished(run_dir_of(p, s, k), total_steps)), None)
            if found is None:
                missing.append(f"{s}/seed{k}: not finished (no summary.json"
                               + ("" if total_steps is None else f" of {total_steps} steps") + ")")
                continue
            try:
                runs.setdefault(s, {})[k] = load_run(found, s, k, metric)
            except (FileNotFoundError, ValueError) as exc:
                missing.append(f"{s}/seed{k}: {exc}")
    return runs, missing
