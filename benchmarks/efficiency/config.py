"""The benchmark config: one YAML file fixes a benchmark (strategies, seeds, the trainer's
overrides under ``train:``, a smaller ``quick:`` variant); its file name fixes the report's name
(``benchmarks/configs/testbed_countdown.yaml`` -> ``benchmarks/results/testbed_countdown.*``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from prepo.config import STRATEGIES, from_dict

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "rollout_efficiency.yaml"
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_TITLE = "Rollout efficiency: PREPO vs baselines (issue 5)"
# keys of the trainer config that never change a run's result (ignored when checking that an
# existing run matches)
NON_RESULT_KEYS = ("resume", "progress", "tensorboard", "output_dir", "save_every", "cache_dir")
# the PRIMARY statistic's targets (benchmarks/efficiency/stats.py): the accuracy each paired seed must
# reach is the baseline seed's final accuracy (the toy testbeds' rule), or the accuracy the baseline's
# smoothed curve has at half its rollout budget (reachable before the baseline plateaus or ends)
PRIMARIES = ("final_threshold", "half_budget_threshold")
# how every CI over seeds is made (benchmarks/efficiency/stats.py): the paired bootstrap, or the
# Student t interval of the mean (of the log ratio for the PRIMARY)
INTERVALS = ("bootstrap", "t")
# the keys a ``quick:`` section may override besides ``train:``
QUICK_KEYS = ("strategies", "seeds", "jobs", "metric", "final_evals")


@dataclass(frozen=True)
class Sequential:
    """A sequential study (``sequential:``; the rule is :mod:`.sequential`'s): the seeds run in
    blocks of ``block``; the first look at ``compare``'s PRIMARY interval comes after ``first``
    paired seeds, then one after each block, up to every listed seed (the cap). ``control``: a
    positive-control strategy, whose result the report states beside the look."""

    compare: str
    first: int
    block: int
    control: str = ""


SEQUENTIAL_KEYS = tuple(f.name for f in dataclasses.fields(Sequential))


@dataclass
class BenchConfig:
    """One benchmark. Every field but ``stem`` and ``is_quick`` is a key of the YAML file."""

    stem: str                    # the config file's name without its suffix: the report files' name
    strategies: list[str]
    seeds: list[int]             # the reported seeds; strategy seed s is paired with baseline seed s
    tuning_seeds: list[int] = field(default_factory=list)   # seeds used for tuning: never reported
    baseline: str = "random"
    metric: str = "eval_accuracy"     # a metrics.jsonl eval key: eval_accuracy (greedy) or eval_avg@<k>
    final_evals: int = 1         # a run's final accuracy: the mean of its last final_evals evaluations
    jobs: int = 1                # runs in parallel
    primary: str = PRIMARIES[0]  # the PRIMARY ratio's target, one of PRIMARIES
    runs_dir: str = ""           # relative to the repository root; "" -> runs/<stem>
    title: str = DEFAULT_TITLE   # the report's title
    description: str = ""        # a paragraph under the title
    train: dict = field(default_factory=dict)   # TrainConfig overrides shared by every run
    strategy_train: dict = field(default_factory=dict)   # {strategy: TrainConfig overrides on top of train:}
    interval: str = INTERVALS[0]  # the kind of every CI over seeds, one of INTERVALS
    sequential: Optional[Sequential] = None   # seeds in blocks and a stopping rule; None: every seed runs
    is_quick: bool = False       # the --quick smoke variant (not evidence)


YAML_KEYS = tuple(f.name for f in dataclasses.fields(BenchConfig) if f.name not in ("stem", "is_quick")) + ("quick",)


def load_bench_config(path: Path, quick: bool = False) -> BenchConfig:
    """The benchmark of the YAML file ``path``; with ``quick`` its ``quick:`` section overrides the
    top-level keys (``train:`` key by key). Bad keys or values exit with a message naming them."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - set(YAML_KEYS)
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}; valid: {', '.join(YAML_KEYS)}")
    q = dict(data.pop("quick", None) or {})
    q_train = q.pop("train", None) or {}
    if set(q) - set(QUICK_KEYS):
        raise SystemExit(f"{path}: unknown keys under quick: {sorted(set(q) - set(QUICK_KEYS))}; "
                         f"valid: train, {', '.join(QUICK_KEYS)}")
    if quick:
        data.update(q, train={**(data.get("train") or {}), **q_train})
    bench = BenchConfig(
        stem=path.stem,
        strategies=list(data.get("strategies") or []),
        seeds=[int(s) for s in data.get("seeds") or []],
        tuning_seeds=[int(s) for s in data.get("tuning_seeds") or []],
        baseline=str(data.get("baseline", "random")),
        metric=str(data.get("metric", "eval_accuracy")),
        final_evals=int(data.get("final_evals", 1)),
        jobs=int(data.get("jobs", 1)),
        primary=str(data.get("primary", PRIMARIES[0])),
        runs_dir=str(data.get("runs_dir") or f"runs/{path.stem}"),
        title=str(data.get("title") or DEFAULT_TITLE),
        description=str(data.get("description") or "").strip(),
        train=dict(data.get("train") or {}),
        strategy_train={str(k): dict(v or {}) for k, v in (data.get("strategy_train") or {}).items()},
        interval=str(data.get("interval", INTERVALS[0])),
        sequential=_sequential(data.get("sequential"), path),
        is_quick=quick,
    )
    _check(bench, path)
    return bench


def _sequential(data: Optional[dict], path: Path) -> Optional[Sequential]:
    """The ``sequential:`` section, or None without one."""
    if data is None:
        return None
    unknown = set(data) - set(SEQUENTIAL_KEYS)
    if unknown or not {"compare", "first", "block"} <= set(data):
        raise SystemExit(f"{path}: sequential: needs compare, first and block (optional: control); got {sorted(data)}")
    return Sequential(str(data["compare"]), int(data["first"]), int(data["block"]), str(data.get("control") or ""))


def _check_sequential(bench: BenchConfig, path: Path) -> None:
    """Exit unless the sequential design fits the strategies and seeds."""
    seq = bench.sequential
    arms = [seq.compare] + ([seq.control] if seq.control else [])
    if any(a not in bench.strategies or a == bench.baseline for a in arms):
        raise SystemExit(f"{path}: sequential: compare / control must be strategies other than the baseline; got {arms}")
    cap = len(bench.seeds)
    if not (1 <= seq.block <= seq.first <= cap and (cap - seq.first) % seq.block == 0):
        raise SystemExit(f"{path}: sequential: need 1 <= block <= first <= the {cap} seeds, and the seeds after the "
                         f"first look a whole number of blocks; got first {seq.first}, block {seq.block}")


def _check(bench: BenchConfig, path: Path) -> None:
    """Exit with a message naming the first invalid setting."""
    unknown = [s for s in bench.strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"{path}: unknown strategies {unknown}; the trainer's: {', '.join(STRATEGIES)}")
    if bench.baseline not in bench.strategies:
        raise SystemExit(f"{path}: baseline {bench.baseline!r} must be one of the strategies {bench.strategies}")
    if not bench.seeds:
        raise SystemExit(f"{path}: no seeds")
    overlap = set(bench.seeds) & set(bench.tuning_seeds)
    if overlap:
        raise SystemExit(f"{path}: reported seeds {sorted(overlap)} were also used for tuning; report other seeds")
    if not bench.metric.startswith("eval_"):
        raise SystemExit(f"{path}: metric must be a metrics.jsonl eval key such as eval_accuracy or eval_avg@8; "
                         f"got {bench.metric!r}")
    if bench.primary not in PRIMARIES:
        raise SystemExit(f"{path}: primary must be one of {', '.join(PRIMARIES)}; got {bench.primary!r}")
    if bench.final_evals < 1 or bench.jobs < 1:
        raise SystemExit(f"{path}: final_evals and jobs must be >= 1; got {bench.final_evals}, {bench.jobs}")
    if bench.interval not in INTERVALS:
        raise SystemExit(f"{path}: interval must be one of {', '.join(INTERVALS)}; got {bench.interval!r}")
    if set(bench.strategy_train) - set(bench.strategies):
        raise SystemExit(f"{path}: strategy_train names strategies the study does not run: "
                         f"{sorted(set(bench.strategy_train) - set(bench.strategies))}")
    if bench.sequential is not None:
        _check_sequential(bench, path)


def run_dir_of(runs_dir: Path, strategy: str, seed: int) -> Path:
    """Where one run writes: ``<runs_dir>/<strategy>/seed<seed>``."""
    return Path(runs_dir) / strategy / f"seed{seed}"


def run_config(bench: BenchConfig, strategy: str, seed: int, runs_dir: Path) -> dict:
    """The trainer overrides of one run: the shared ``train:`` keys, the strategy's own
    (``strategy_train:``), its strategy, seed and directory."""
    return {**bench.train, **bench.strategy_train.get(strategy, {}), "strategy": strategy, "seed": seed,
            "output_dir": str(run_dir_of(runs_dir, strategy, seed))}


def full_config(overrides: dict, check_environment: bool = True) -> dict:
    """The trainer's full config for these overrides (defaults filled in, validated). Without
    ``check_environment`` the rollout engine is not asked of this machine: a report of runs made
    with vLLM is written where vLLM is not installed (a fresh clone, from the runs archive)."""
    if check_environment:
        return from_dict(overrides).to_dict()
    engine = overrides.get("rollout_engine", "hf")
    return {**from_dict({**overrides, "rollout_engine": "hf"}).to_dict(), "rollout_engine": engine}


def report_config(bench: BenchConfig) -> dict:
    """The baseline run's full trainer config, as the report reads it (no checks of this machine)."""
    return full_config({**bench.train, "strategy": bench.baseline}, check_environment=False)
