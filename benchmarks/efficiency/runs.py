"""Reads a finished run (the trainer's ``metrics.jsonl`` as typed
:class:`~prepo.metrics.StepMetrics`, ``eval.jsonl``, ``selection.jsonl``, ``initial.json``,
``summary.json``) into :class:`RunData`, from its run directory or from the study's runs archive:
one gzipped JSON file holding every finished run's small files (never the checkpoints) and how the
runs were made (``harness.json``), which :func:`archive_run` keeps up to date and the repository
commits (what a fresh clone rebuilds the report from)."""
from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from prepo.metrics import StepMetrics

from .config import ROOT, BenchConfig, report_config, run_dir_of


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


# a finished run's small files: the raw data of the report (never the checkpoints)
RUN_FILES = ("config.yaml", "initial.json", "eval.jsonl", "metrics.jsonl", "selection.jsonl", "summary.json")
Files = dict   # {file name: text} of one run, the RUN_FILES it has


def _json(files: Files, name: str) -> dict:
    return json.loads(files[name]) if name in files else {}


def _jsonl(files: Files, name: str) -> list[dict]:
    return [json.loads(line) for line in files.get(name, "").splitlines()]


def run_files(run_dir: Path) -> Files:
    """The RUN_FILES in ``run_dir`` (those present)."""
    return {name: (run_dir / name).read_text() for name in RUN_FILES if (run_dir / name).is_file()}


def load_run(run_dir: Path, strategy: str, seed: int, metric: str) -> RunData:
    """The run in the directory ``run_dir`` (see :func:`run_from_files`)."""
    return run_from_files(run_files(Path(run_dir)), str(run_dir), strategy, seed, metric)


def run_from_files(files: Files, where: str, strategy: str, seed: int, metric: str) -> RunData:
    """The run whose files are ``files`` (``where``: its place, for messages). Its curve is the
    ``metric`` (an eval key such as ``eval_avg@8``) of the step records that have it, preceded by the
    step-0 evaluation from eval.jsonl (or initial.json). FileNotFoundError / ValueError when the run
    has no records / no such metric."""
    metrics = [StepMetrics.from_dict(row) for row in _jsonl(files, "metrics.jsonl")]
    if not metrics:
        raise FileNotFoundError(f"{where}/metrics.jsonl is missing or empty")
    twice = sorted(k for k, n in Counter(m.step for m in metrics).items() if n > 1)
    if twice:
        raise ValueError(f"{where}/metrics.jsonl: steps {twice} appear more than once (two trainers "
                         "wrote this run?); the curve would count them twice")
    initial = _json(files, "initial.json")
    evals = _jsonl(files, "eval.jsonl")
    step0 = next((e for e in evals if e.get("step") == 0), None) or initial.get("eval")
    eval_key = metric.removeprefix("eval_")   # eval.jsonl names it without the prefix
    curve = [(0, float(step0[eval_key]))] if step0 is not None and step0.get(eval_key) is not None else []
    curve += [(int(m.rollouts), float(m.eval[metric])) for m in metrics if (m.eval or {}).get(metric) is not None]
    if not curve:
        raise ValueError(f"{where}: no {metric!r} values in metrics.jsonl (is eval_avg_k set?)")
    greedy = [m.eval["eval_accuracy"] for m in metrics if (m.eval or {}).get("eval_accuracy") is not None]
    return RunData(strategy, seed, curve, metrics, initial, _json(files, "summary.json"),
                   greedy[-1] if greedy else None, _levels(step0), _levels(evals[-1] if evals else None),
                   _jsonl(files, "selection.jsonl"))


def is_finished(files: Files, total_steps: Optional[int] = None) -> bool:
    """Whether ``files`` hold a finished run: a summary.json covering ``total_steps`` steps (any
    number when None)."""
    summary = _json(files, "summary.json")
    return bool(summary) and (total_steps is None or summary.get("steps") == total_steps)


# ---------------------------------------------------------------- the study's runs archive

def run_key(strategy: str, seed: int) -> str:
    return f"{strategy}/seed{seed}"


def read_archive(path: Path) -> dict:
    """{"harness": harness.json's object or None, "runs": {"<strategy>/seed<k>": Files}} of the
    archive ``path``; empty when it does not exist."""
    if not Path(path).exists():
        return {"harness": None, "runs": {}}
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _write_archive(path: Path, archive: dict) -> None:
    """Written to a temporary name and renamed (a reader never sees half of it); the bytes depend
    on the content alone (no time stamp), so an unchanged archive stays unchanged in git."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(json.dumps(archive, indent=0).encode())
    os.replace(tmp, path)


def archive_run(run_dir: Path, archive: Path, strategy: str, seed: int, root: Path = ROOT) -> None:
    """Put the finished run in ``run_dir`` into the study's ``archive`` (replacing an earlier copy).
    Paths under ``root`` (the repository) are written relative to it, so that the committed copy
    reads the same on every machine."""
    prefix = f"{Path(root).resolve()}{os.sep}"
    data = read_archive(archive)
    data["runs"][run_key(strategy, seed)] = {k: v.replace(prefix, "") for k, v in run_files(Path(run_dir)).items()}
    _write_archive(Path(archive), data)


def archive_harness(archive: Path, harness: dict) -> None:
    """Put how the runs were made (the runs directory's harness.json) into the study's ``archive``."""
    data = read_archive(archive)
    data["harness"] = harness
    _write_archive(Path(archive), data)


def _files_at(place: Path, strategy: str, seed: int) -> Files:
    """The run's files in ``place``: a runs directory, or a runs archive (a ``.gz`` file)."""
    if place.suffix == ".gz":
        return read_archive(place)["runs"].get(run_key(strategy, seed), {})
    return run_files(run_dir_of(place, strategy, seed))


def load_runs(places: Sequence[Path], strategies: Sequence[str], seeds: Sequence[int], metric: str,
              total_steps: Optional[int] = None) -> tuple[dict, list[str]]:
    """({strategy: {seed: RunData}}, missing): each (strategy, seed) from the first of ``places``
    (runs directories or runs archives, e.g. the runs and the study's archive) where it is finished
    (see :func:`is_finished`); ``missing`` says why each other run is not there ('<strategy>/seed<k>: ...')."""
    runs: dict = {}
    missing = []
    for s in strategies:
        for k in seeds:
            found = next(((p, f) for p in places if is_finished(f := _files_at(Path(p), s, k), total_steps)), None)
            if found is None:
                missing.append(f"{s}/seed{k}: not finished (no summary.json"
                               + ("" if total_steps is None else f" of {total_steps} steps") + ")")
                continue
            try:
                runs.setdefault(s, {})[k] = run_from_files(found[1], f"{found[0]}:{run_key(s, k)}", s, k, metric)
            except (FileNotFoundError, ValueError) as exc:
                missing.append(f"{s}/seed{k}: {exc}")
    return runs, missing


def load_finished(bench: BenchConfig, places: Sequence[Path]) -> tuple[dict, list[str]]:
    """(runs, missing): the finished runs of ``bench`` found in ``places`` (the runs directory, the
    runs archive) and why each other run is missing; a strategy run whose baseline seed is missing
    cannot be paired and counts as missing (so without a finished baseline run, runs is empty)."""
    steps = report_config(bench)["total_steps"]
    runs, missing = load_runs(places, bench.strategies, bench.seeds, bench.metric, steps)
    base = runs.get(bench.baseline, {})
    for s, rs in runs.items():
        for k in [k for k in rs if k not in base]:
            del rs[k]
            missing.append(f"{s}/seed{k}: finished, but unpaired until {bench.baseline}/seed{k} is")
    return {s: rs for s, rs in runs.items() if rs}, missing
