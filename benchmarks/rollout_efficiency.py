"""Does PREPO save rollouts? (issue 5) -- ``python benchmarks/rollout_efficiency.py``

Runs every (strategy, seed) of ONE committed config (``benchmarks/configs/rollout_efficiency.yaml``,
hyperparameters fixed before measuring) on the trainer's built-in task, each as its own
``python -m prepo.train`` process writing into ``<runs_dir>/<strategy>/seed<k>/``, then aggregates
from the runs' ``metrics.jsonl`` (+ ``eval.jsonl`` for the step-0 point, ``initial.json`` for the
Spearman diagnostic):

* final accuracy per strategy (mean and spread over seeds);
* the cumulative rollouts at which each seed first reaches the BASELINE's (random's) final mean
  accuracy ("not reached" allowed), and the ratio of those rollouts to the baseline's;
* Spearman(prompt perplexity, pass rate) of the initial policy (logged by the trainer);
* diagnostics for the "why": mean zero-advantage group fraction, weight range, entropy, selected
  difficulty, reward;
* a PNG of accuracy vs cumulative rollouts (mean and a min-max band over seeds per strategy), a
  diagnostics PNG, a CSV and a markdown report under ``benchmarks/results/``.

Runs whose ``summary.json`` exists (with the same config) are skipped, runs with a checkpoint but no
summary are resumed, so an interrupted harness picks up where it stopped.

  python benchmarks/rollout_efficiency.py                  # full run + aggregate (the evidence)
  python benchmarks/rollout_efficiency.py --aggregate-only # re-aggregate existing runs
  python benchmarks/rollout_efficiency.py --quick          # tiny smoke version into a temp dir
  python benchmarks/rollout_efficiency.py --update-readme README.md  # also paste the table there

``--quick`` writes nothing under benchmarks/results/ (its report goes to the temp dir).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # this checkout's trainer

from prepo.config import STRATEGIES, from_dict  # noqa: E402
from prepo.metrics import StepMetrics  # noqa: E402

DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "rollout_efficiency.yaml"
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULT_STEM = "rollout_efficiency"
SMOOTH_EVALS = 3  # the robustness variant: every curve as a trailing mean over 3 evaluations
README_BEGIN = "<!-- rollout_efficiency:begin -->"
README_END = "<!-- rollout_efficiency:end -->"
# keys of the benchmark config that are not TrainConfig overrides
BENCH_KEYS = ("strategies", "seeds", "tuning_seeds", "baseline", "metric", "jobs", "runs_dir", "train", "quick")
# keys that never change a run's result (ignored when checking that an existing run matches)
NON_RESULT_KEYS = ("resume", "progress", "tensorboard", "output_dir", "save_every", "cache_dir")


# ====================================================================== configuration
def load_bench_config(path: Path, quick: bool = False) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - set(BENCH_KEYS)
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}; valid: {', '.join(BENCH_KEYS)}")
    bench = {
        "strategies": list(data.get("strategies", [])),
        "seeds": [int(s) for s in data.get("seeds", [])],
        "tuning_seeds": [int(s) for s in data.get("tuning_seeds", []) or []],
        "baseline": data.get("baseline", "random"),
        "metric": data.get("metric", "eval_accuracy"),
        "jobs": int(data.get("jobs", 1)),
        "runs_dir": data.get("runs_dir", "runs/rollout_efficiency"),
        "train": dict(data.get("train", {}) or {}),
        "is_quick": quick,
    }
    if quick:
        q = dict(data.get("quick", {}) or {})
        for k in ("strategies", "seeds", "jobs", "metric"):
            if k in q:
                bench[k] = q.pop(k)
        bench["train"].update(q.pop("train", {}) or {})
        if q:
            raise SystemExit(f"{path}: unknown keys under quick: {sorted(q)}")
    unknown = [s for s in bench["strategies"] if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"{path}: unknown strategies {unknown}; the trainer's: {', '.join(STRATEGIES)}")
    if bench["baseline"] not in bench["strategies"]:
        raise SystemExit(f"baseline {bench['baseline']!r} must be one of the strategies {bench['strategies']}")
    overlap = set(bench["seeds"]) & set(bench["tuning_seeds"])
    if overlap:
        raise SystemExit(f"reported seeds {sorted(overlap)} were also used for tuning; report other seeds")
    return bench


def metric_keys(metric: str) -> tuple[str, str]:
    """(key in metrics.jsonl, key in eval.jsonl / initial.json['eval']) of the accuracy metric."""
    if not metric.startswith("eval_"):
        raise SystemExit(f"metric must be a metrics.jsonl eval key such as eval_accuracy or eval_avg@8; got {metric!r}")
    return metric, metric[len("eval_"):]


def run_config(bench: dict, strategy: str, seed: int, runs_dir: Path) -> dict:
    cfg = dict(bench["train"])
    cfg.update({"strategy": strategy, "seed": seed, "output_dir": str(run_dir_of(runs_dir, strategy, seed))})
    return cfg


def run_dir_of(runs_dir: Path, strategy: str, seed: int) -> Path:
    return Path(runs_dir) / strategy / f"seed{seed}"


# ====================================================================== running
def _full_config(cfg: dict) -> dict:
    """The trainer's full config for these overrides (defaults filled in), for comparisons."""
    return from_dict(cfg).to_dict()


def _config_diff(want: dict, have: dict) -> list[str]:
    keys = (set(want) | set(have)) - set(NON_RESULT_KEYS)
    return sorted(k for k in keys if want.get(k) != have.get(k))


def run_status(run_dir: Path, cfg: dict) -> tuple[str, list[str]]:
    """('done' | 'resume' | 'new' | 'mismatch', differing keys)."""
    existing = run_dir / "config.yaml"
    if not existing.exists():
        return "new", []
    diff = _config_diff(_full_config(cfg), yaml.safe_load(existing.read_text()) or {})
    if diff:
        return "mismatch", diff
    if (run_dir / "summary.json").exists():
        summ = json.loads((run_dir / "summary.json").read_text())
        if summ.get("steps") == _full_config(cfg)["total_steps"]:
            return "done", []
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        return "resume", []
    return "new", []


def _prebuild_base_model(cfg: dict) -> None:
    """Build the warm-up checkpoint once, before parallel jobs would each build it."""
    tc = from_dict(cfg)
    if tc.model:
        return
    import torch

    from prepo.model import get_base_model_dir

    # the runs' thread count: on a busy 2-core machine extra threads slow this down many-fold
    torch.set_num_threads(tc.num_threads)
    t0 = time.perf_counter()
    path, built = get_base_model_dir(tc.warmup_config(), Path(tc.cache_dir) if tc.cache_dir else None)
    if built:
        print(f"built the warm-up base model in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)


def launch(cfg: dict, resume: bool) -> tuple[int, float]:
    """Run one training job as a subprocess; its log goes to output_dir/train.log."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    req = out / "requested.yaml"
    req.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "prepo.train", "--config", str(req)]
    if resume:
        cmd += ["--resume", "true"]
    env = dict(os.environ)
    threads = str(cfg.get("num_threads", 2))
    env.update({"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    t0 = time.perf_counter()
    with (out / "train.log").open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - t0


def run_all(bench: dict, runs_dir: Path, jobs: int, rerun_mismatched: bool = False) -> dict:
    plan = []
    for strategy in bench["strategies"]:
        for seed in bench["seeds"]:
            cfg = run_config(bench, strategy, seed, runs_dir)
            status, diff = run_status(Path(cfg["output_dir"]), cfg)
            if status == "mismatch":
                if not rerun_mismatched:
                    raise SystemExit(
                        f"{cfg['output_dir']} holds a run with a different config (keys {diff}); "
                        "delete it or pass --rerun-mismatched")
                shutil.rmtree(cfg["output_dir"])
                status = "new"
            plan.append((strategy, seed, cfg, status))
    # longest first (dynamic sampling generates several times the rollouts per step), so the
    # parallel slots finish together
    todo = sorted((p for p in plan if p[3] != "done"), key=lambda p: p[0] != "dapo_dynamic")
    print(f"{len(plan)} runs, {len(plan) - len(todo)} already done, {len(todo)} to run "
          f"({jobs} in parallel)", flush=True)
    if todo:
        _prebuild_base_model(todo[0][2])
    t_start = time.perf_counter()
    times: dict = {}

    def job(item):
        strategy, seed, cfg, status = item
        rc, sec = launch(cfg, resume=status == "resume")
        done = len(times) + 1
        times[(strategy, seed)] = sec
        state = "ok" if rc == 0 else f"FAILED rc={rc} (see {cfg['output_dir']}/train.log)"
        print(f"[{done}/{len(todo)}] {strategy} seed {seed}: {sec:.0f}s {state} "
              f"(elapsed {time.perf_counter() - t_start:.0f}s)", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rcs = list(pool.map(job, todo))
    failed = [f"{s}/seed{k}" for (s, k, _, _), rc in zip(todo, rcs) if rc != 0]
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    return {"wall_seconds": time.perf_counter() - t_start, "run_seconds": {f"{s}/seed{k}": v for (s, k), v in times.items()}}


# ====================================================================== reading runs
def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RunData:
    strategy: str
    seed: int
    curve: list  # [(cumulative rollouts, accuracy)], step 0 first when known
    metrics: list[StepMetrics] = field(default_factory=list)   # the trainer's step records
    initial: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    greedy_final: Optional[float] = None
    levels_initial: dict = field(default_factory=dict)  # greedy accuracy per difficulty level, step 0
    levels_final: dict = field(default_factory=dict)    # ... at the last evaluation

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    @property
    def initial_acc(self) -> Optional[float]:
        return self.curve[0][1] if self.curve and self.curve[0][0] == 0 else None

    @property
    def total_rollouts(self) -> int:
        if self.metrics:
            return int(self.metrics[-1].rollouts)
        return int(self.curve[-1][0])


def load_run(run_dir: Path, strategy: str, seed: int, metric: str) -> RunData:
    """The accuracy curve comes from metrics.jsonl (rows with the metric), preceded by the step-0
    evaluation from eval.jsonl (or initial.json)."""
    mkey, ekey = metric_keys(metric)
    metrics = [StepMetrics.from_dict(row) for row in read_jsonl(run_dir / "metrics.jsonl")]
    if not metrics:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty")
    initial = json.loads((run_dir / "initial.json").read_text()) if (run_dir / "initial.json").exists() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    curve = []
    evals = read_jsonl(run_dir / "eval.jsonl")
    step0 = next((e for e in evals if e.get("step") == 0), None) or initial.get("eval")
    if step0 is not None and step0.get(ekey) is not None:
        curve.append((0, float(step0[ekey])))
    curve += [(int(m.rollouts), float(m.eval[mkey])) for m in metrics if (m.eval or {}).get(mkey) is not None]
    if not curve:
        raise ValueError(f"{run_dir}: no {metric!r} values in metrics.jsonl (is eval_avg_k set?)")
    greedy = [m.eval["eval_accuracy"] for m in metrics if (m.eval or {}).get("eval_accuracy") is not None]
    def levels(e):
        return {int(k[len("accuracy_level"):]): float(v) for k, v in (e or {}).items() if k.startswith("accuracy_level")}

    return RunData(strategy, seed, curve, metrics, initial, summary, greedy[-1] if greedy else None,
                   levels(step0), levels(evals[-1] if evals else None))


def load_runs(runs_dir: Path, strategies: Sequence[str], seeds: Sequence[int], metric: str) -> dict:
    runs: dict = {}
    missing = []
    for s in strategies:
        for k in seeds:
            d = run_dir_of(runs_dir, s, k)
            try:
                runs.setdefault(s, {})[k] = load_run(d, s, k, metric)
            except (FileNotFoundError, ValueError) as exc:
                missing.append(str(exc))
    if missing:
        raise SystemExit("cannot aggregate:\n  " + "\n  ".join(missing))
    return runs


# ====================================================================== aggregation
def rollouts_to_threshold(curve: Sequence[tuple], threshold: float, tol: float = 1e-9) -> Optional[int]:
    """Cumulative rollouts at the first evaluation whose accuracy reaches ``threshold``
    (``>= threshold - tol``), or None when no evaluation does."""
    for x, acc in curve:
        if acc >= threshold - tol:
            return int(x)
    return None


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def rollouts_summary(per_seed: Sequence[Optional[int]], budgets: Sequence[int]) -> dict:
    """Mean rollouts-to-threshold over the seeds that reached it, and a conservative mean that
    counts a seed that never reached it at its whole budget (a lower bound on what it needs)."""
    reached = [r for r in per_seed if r is not None]
    bounded = [r if r is not None else b for r, b in zip(per_seed, budgets)]
    return {
        "n_reached": len(reached),
        "n": len(per_seed),
        "mean_reached": float(np.mean(reached)) if reached else None,
        "mean_bounded": float(np.mean(bounded)) if bounded else None,
    }


def ratio_vs_baseline(strat: dict, base: dict) -> dict:
    """Ratio of rollouts-to-threshold, strategy / baseline (< 1: fewer rollouts than the baseline),
    from :func:`rollouts_summary` dicts. A seed that did not reach the threshold counts at its
    budget, so when only the strategy has such seeds the ratio is a lower bound ('>='); when the
    baseline has some too it is not a bound either way ('~'). 0/0 (both reach it before training)
    gives None."""
    num, den = strat["mean_bounded"], base["mean_bounded"]
    if num is None or den is None or den == 0:
        return {"ratio": None, "qualifier": "n/a"}
    s_all = strat["n_reached"] == strat["n"]
    b_all = base["n_reached"] == base["n"]
    qual = "=" if (s_all and b_all) else (">=" if b_all else "~")
    return {"ratio": num / den, "qualifier": qual}


# a step record's value: StepMetrics -> number or None
Field = Callable[[StepMetrics], Optional[float]]


def _mean_of(metrics: list[StepMetrics], get: Field, frac: tuple = (0.0, 1.0)) -> Optional[float]:
    """Mean of ``get`` over the steps in the fraction ``frac`` of the run (None values skipped)."""
    n = len(metrics)
    lo, hi = int(math.floor(frac[0] * n)), max(int(math.ceil(frac[1] * n)), int(math.floor(frac[0] * n)) + 1)
    vals = [v for v in map(get, metrics[lo:hi]) if v is not None]
    return float(np.mean(vals)) if vals else None


def generated_zero_adv_frac(metrics: list[StepMetrics]) -> Optional[float]:
    """Fraction of all GENERATED groups whose rewards were all equal. For DAPO dynamic sampling the
    trained groups never are (they were dropped), so this counts the dropped ones."""
    dyn = [m.dynamic or {} for m in metrics]
    gen = sum(d.get("dynamic_groups_generated", 0) or 0 for d in dyn)
    if gen:
        kept = sum(d.get("dynamic_groups_kept", 0) or 0 for d in dyn)
        # kept groups are by construction not all-equal
        return (gen - kept) / gen
    return _mean_of(metrics, lambda m: m.batch.zero_adv_frac)


def smooth_curve(curve: Sequence[tuple], k: int) -> list:
    """Trailing mean over the last ``k`` evaluations (fewer at the start): the point at x is the
    mean of the accuracies at x and the k - 1 evaluations before it."""
    accs = [a for _, a in curve]
    return [(x, float(np.mean(accs[max(0, i - k + 1) : i + 1]))) for i, (x, _) in enumerate(curve)]


def smoothed_runs(runs: dict, k: int) -> dict:
    """The same runs with every curve replaced by its k-evaluation trailing mean (so "final" is the
    mean of the last k evaluations) -- a less noise-driven variant of the headline numbers."""
    return {s: {seed: dataclasses.replace(r, curve=smooth_curve(r.curve, k)) for seed, r in rs.items()}
            for s, rs in runs.items()}


def aggregate(runs: dict, baseline: str) -> dict:
    """Everything the report shows, from {strategy: {seed: RunData}}."""
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} has no runs")
    base_finals = [r.final for r in runs[baseline].values()]
    threshold = float(np.mean(base_finals))
    initials = [r.initial_acc for rs in runs.values() for r in rs.values() if r.initial_acc is not None]
    degenerate = bool(initials) and threshold <= max(initials) + 1e-9
    rows = []
    base_rt = None
    for strategy in [baseline] + [s for s in runs if s != baseline]:
        rs = runs[strategy]
        seeds = sorted(rs)
        finals = [rs[k].final for k in seeds]
        per_seed = [rollouts_to_threshold(rs[k].curve, threshold) for k in seeds]
        budgets = [rs[k].total_rollouts for k in seeds]
        rt = rollouts_summary(per_seed, budgets)
        if strategy == baseline:
            base_rt = rt
        mets = [rs[k].metrics for k in seeds]

        def avg(get: Field, frac=(0.0, 1.0)):
            vals = [_mean_of(m, get, frac) for m in mets]
            vals = [v for v in vals if v is not None]
            return float(np.mean(vals)) if vals else None

        fm, fs = _mean_std(finals)
        im = [rs[k].initial_acc for k in seeds if rs[k].initial_acc is not None]
        greedy = [rs[k].greedy_final for k in seeds if rs[k].greedy_final is not None]
        wmin = [min(m.batch.weight_min for m in ms) for ms in mets if ms]
        wmax = [max(m.batch.weight_max for m in ms) for ms in mets if ms]
        rows.append({
            "strategy": strategy,
            "seeds": seeds,
            "final_mean": fm,
            "final_std": fs,
            "final_per_seed": finals,
            "initial_mean": float(np.mean(im)) if im else None,
            "greedy_final_mean": float(np.mean(greedy)) if greedy else None,
            "rollouts_to_threshold": per_seed,
            "budget_rollouts": budgets,
            **{f"rt_{k}": v for k, v in rt.items()},
            "zero_adv_frac": avg(lambda m: m.batch.zero_adv_frac),
            "generated_zero_adv_frac": float(np.mean([generated_zero_adv_frac(m) for m in mets])),
            "weight_min": float(np.min(wmin)) if wmin else None,
            "weight_max": float(np.max(wmax)) if wmax else None,
            "weight_min_mean": avg(lambda m: m.batch.weight_min),
            "weight_max_mean": avg(lambda m: m.batch.weight_max),
            "weight_p10_mean": avg(lambda m: m.batch.weight_p10),
            "weight_p90_mean": avg(lambda m: m.batch.weight_p90),
            "weight_applied": bool(mets[0][0].weight_applied) if mets and mets[0] else None,
            "entropy_mean": avg(lambda m: m.batch.entropy_mean),
            "entropy_first10": avg(lambda m: m.batch.entropy_mean, (0.0, 0.1)),
            "entropy_last10": avg(lambda m: m.batch.entropy_mean, (0.9, 1.0)),
            "reward_mean": avg(lambda m: m.batch.reward_mean),
            "selected_difficulty": avg(lambda m: m.selected_difficulty),
            # greso: prompts skipped before rollout per step (None for the other strategies)
            "greso_skipped_mean": avg(lambda m: (m.selection or {}).get("greso_skipped")),
            "levels_initial": _mean_levels([rs[k].levels_initial for k in seeds]),
            "levels_final": _mean_levels([rs[k].levels_final for k in seeds]),
            "train_seconds": float(np.mean([rs[k].summary.get("train_seconds_this_process", float("nan")) for k in seeds])),
        })
    for row in rows:
        row.update({f"ratio_{k}": v for k, v in ratio_vs_baseline(
            {k[3:]: row[k] for k in row if k.startswith("rt_")}, base_rt).items()})
    return {
        "baseline": baseline,
        "threshold": threshold,
        "degenerate_threshold": degenerate,
        "rows": rows,
        "spearman": spearman_summary(runs),
    }


def _mean_levels(per_seed: list) -> dict:
    keys = sorted({k for d in per_seed for k in d})
    return {k: float(np.mean([d[k] for d in per_seed if k in d])) for k in keys}


def spearman_summary(runs: dict) -> dict:
    """The initial policy's Spearman(prompt PPL, pass rate), logged by the trainer in initial.json.
    The base model and the Spearman pool depend only on the seed, so one value per seed."""
    per_seed: dict = {}
    for rs in runs.values():
        for k, r in rs.items():
            v = r.initial.get("spearman_ppl_passrate")
            if v is not None and k not in per_seed:
                per_seed[k] = {kk: r.initial.get(kk) for kk in
                               ("spearman_ppl_passrate", "spearman_pvalue", "n_prompts", "samples",
                                "pass_rate_mean", "pass_rate_hist")}
    vals = [v["spearman_ppl_passrate"] for v in per_seed.values()]
    out = {"per_seed": per_seed}
    if vals:
        m, s = _mean_std(vals)
        out.update({"mean": m, "std": s})
    return out


# ====================================================================== report
def _fmt_pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _fmt_num(x: Optional[float], fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _fmt_rollouts(per_seed: Sequence[Optional[int]]) -> str:
    return ", ".join("not reached" if r is None else f"{r:,}" for r in per_seed)


def _fmt_ratio(row: dict) -> str:
    if row["ratio_ratio"] is None:
        return "n/a"
    q = {"=": "", ">=": "≥", "~": "~"}[row["ratio_qualifier"]]
    return f"{q}{row['ratio_ratio']:.2f}"


def markdown_table(agg: dict, metric: str) -> str:
    base = agg["baseline"]
    lines = [
        f"| strategy | final {metric} % (mean ± std) | rollouts to reach {base}'s final mean ({_fmt_pct(agg['threshold'])}%), per seed | "
        f"mean (reached) | ratio vs {base} | zero-adv groups % (trained / generated) | weight range (min..max) | mean entropy (first→last 10%) | selected difficulty | mean reward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in agg["rows"]:
        mean_reached = "-" if r["rt_mean_reached"] is None else f"{r['rt_mean_reached']:,.0f} ({r['rt_n_reached']}/{r['rt_n']})"
        wr = (f"{_fmt_num(r['weight_min'])}..{_fmt_num(r['weight_max'])} (per step {_fmt_num(r['weight_min_mean'])}.."
              f"{_fmt_num(r['weight_max_mean'])})" + ("" if r["weight_applied"] else ", not applied"))
        lines.append(
            f"| {r['strategy']} | {_fmt_pct(r['final_mean'])} ± {_fmt_pct(r['final_std'])} | {_fmt_rollouts(r['rollouts_to_threshold'])} | "
            f"{mean_reached} | {_fmt_ratio(r)} | {_fmt_pct(r['zero_adv_frac'])} / {_fmt_pct(r['generated_zero_adv_frac'])} | {wr} | "
            f"{_fmt_num(r['entropy_mean'], '.3f')} ({_fmt_num(r['entropy_first10'], '.3f')}→{_fmt_num(r['entropy_last10'], '.3f')}) | "
            f"{_fmt_num(r['selected_difficulty'])} | {_fmt_num(r['reward_mean'], '.3f')} |")
    return "\n".join(lines)


def findings(agg: dict, metric: str) -> list[str]:
    """Plain statements read off the numbers (no interpretation beyond the arithmetic)."""
    out = []
    rows = {r["strategy"]: r for r in agg["rows"]}
    base = rows[agg["baseline"]]
    moved = [f"{n} {_fmt_pct(r['initial_mean'])}→{_fmt_pct(r['final_mean'])}" for n, r in rows.items()
             if r["initial_mean"] is not None]
    if moved:
        out.append(f"Accuracy (%, initial policy → end of training, mean over seeds): {'; '.join(moved)}.")
    if agg["degenerate_threshold"]:
        out.append(f"The baseline's final mean accuracy ({_fmt_pct(agg['threshold'])}%) does not exceed the initial "
                   "policy's accuracy: every strategy 'reaches' it at 0 rollouts, so rollouts-to-threshold and its "
                   "ratio say nothing here; training did not improve on the base policy on average.")
    for name, r in rows.items():
        if name == agg["baseline"]:
            continue
        diff = r["final_mean"] - base["final_mean"]
        if min(len(r["seeds"]), len(base["seeds"])) > 1:
            pooled = math.sqrt((r["final_std"] ** 2 + base["final_std"] ** 2) / 2)
            spread = f"{'within' if abs(diff) <= pooled else 'outside'} one seed-std"
        else:
            spread = "one seed: no spread to compare with"
        paired = [a - b for a, b, in zip(r["final_per_seed"], base["final_per_seed"])] \
            if r["seeds"] == base["seeds"] else []
        wins = sum(d > 0 for d in paired)
        out.append(
            f"{name}: final {_fmt_pct(r['final_mean'])}% vs {agg['baseline']} {_fmt_pct(base['final_mean'])}% "
            f"({'+' if diff >= 0 else ''}{100 * diff:.1f} pts, {spread}"
            + (f"; higher on {wins}/{len(paired)} paired seeds" if paired else "") + "); rollouts ratio "
            f"{_fmt_ratio(r)}" + (f" (= {1 / r['ratio_ratio']:.2f}x {'fewer' if r['ratio_ratio'] < 1 else 'as many'} rollouts)"
                                 if r["ratio_ratio"] else "") + ".")
    za = "; ".join(f"{n} {_fmt_pct(r['zero_adv_frac'])}" for n, r in rows.items())
    out.append(f"Groups with zero advantage (all G rewards equal: no gradient), % of trained groups: {za}.")
    for n, r in rows.items():
        if r["generated_zero_adv_frac"] is not None and abs(r["generated_zero_adv_frac"] - (r["zero_adv_frac"] or 0)) > 1e-9:
            out.append(f"{n} generated groups that were all-equal and dropped: {_fmt_pct(r['generated_zero_adv_frac'])}% "
                       "(their rollouts still count).")
    wts = "; ".join(f"{n} {_fmt_num(r['weight_min_mean'])}..{_fmt_num(r['weight_max_mean'])}" for n, r in rows.items()
                    if r["weight_applied"])
    if wts:
        out.append(f"Relative-entropy weights, mean per-step min..max where applied: {wts} (paper: mostly 0.7-1.5).")
    spread = "; ".join(
        f"{n} " + ", ".join(f"{lab} {_fmt_num(r[k])}" for lab, k in (("p10", "weight_p10_mean"), ("p90", "weight_p90_mean"))
                            if r[k] is not None)
        for n, r in rows.items() if r["weight_applied"] and any(
            r[k] is not None for k in ("weight_p10_mean", "weight_p90_mean")))
    if spread:
        out.append(f"Weight spread, mean over steps: {spread}.")
    skipped = "; ".join(f"{n} {r['greso_skipped_mean']:.2f}" for n, r in rows.items()
                        if r["greso_skipped_mean"] is not None)
    if skipped:
        out.append(f"Prompts skipped before rollout (GRESO's filter), mean per step: {skipped}.")
    sp = agg["spearman"]
    if "mean" in sp:
        out.append(f"Initial policy: Spearman(prompt perplexity, pass rate) = {sp['mean']:.3f} ± {sp['std']:.3f} over "
                   f"{len(sp['per_seed'])} seed pool(s) (paper: -0.17 to -0.23 on DAPO-Math-17K).")
    return out


def robustness_section(agg: dict, metric: str) -> list[str]:
    sm = agg.get("smoothed")
    if not sm:
        return []
    base = sm["baseline"]
    lines = [f"### Robustness: curves as a trailing mean over {SMOOTH_EVALS} evaluations", "",
             f"One evaluation is noisy, and the headline threshold is one noisy point per {base} seed. The same "
             f"numbers with every curve replaced by the mean of its last {SMOOTH_EVALS} evaluations (so 'final' is the "
             f"mean of the last {SMOOTH_EVALS}; the threshold is {base}'s mean of those, {_fmt_pct(sm['threshold'])}%):",
             "",
             f"| strategy | final {metric} %, last-{SMOOTH_EVALS} mean (mean ± std) | rollouts to reach {_fmt_pct(sm['threshold'])}%, per seed | ratio vs {base} |",
             "|---|---|---|---|"]
    for r in sm["rows"]:
        lines.append(f"| {r['strategy']} | {_fmt_pct(r['final_mean'])} ± {_fmt_pct(r['final_std'])} | "
                     f"{_fmt_rollouts(r['rollouts_to_threshold'])} | {_fmt_ratio(r)} |")
    if sm["degenerate_threshold"]:
        lines += ["", f"(Degenerate here too: {base}'s smoothed final accuracy does not exceed the initial accuracy.)"]
    return lines + [""]


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        info["load_avg_at_report"] = os.getloadavg()
    except OSError:
        pass
    return info


def _band(curves: list) -> tuple:
    """Mean / min / max of several (x, y) curves on the union of their x (linear interpolation,
    up to the shortest curve's last x)."""
    xmax = min(c[-1][0] for c in curves)
    xs = sorted({x for c in curves for x, _ in c if x <= xmax})
    ys = np.array([np.interp(xs, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return np.asarray(xs), ys.mean(0), ys.min(0), ys.max(0)


def plot(runs: dict, agg: dict, metric: str, path: Path, diag_path: Optional[Path] = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (strategy, rs) in enumerate(runs.items()):
        xs, mean, lo, hi = _band([r.curve for r in rs.values()])
        color = f"C{i}"
        ax.plot(xs, 100 * mean, marker="o", ms=3, color=color, label=f"{strategy} (n={len(rs)})")
        ax.fill_between(xs, 100 * lo, 100 * hi, color=color, alpha=0.15, lw=0)
    ax.axhline(100 * agg["threshold"], color="k", ls="--", lw=0.8, label=f"{agg['baseline']} final mean")
    ax.set_xlabel("cumulative training rollouts")
    ax.set_ylabel(f"held-out {metric} (%)")
    ax.set_title("accuracy vs rollouts (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if diag_path is not None:
        keys = [(lambda m: m.batch.zero_adv_frac, "zero-advantage group fraction (trained)"),
                (lambda m: m.batch.entropy_mean, "mean token entropy"),
                (lambda m: m.selected_difficulty, "selected prompt difficulty (level)"),
                (lambda m: m.batch.reward_mean, "mean reward")]
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
        for ax, (get, title) in zip(axes.ravel(), keys):
            for i, (strategy, rs) in enumerate(runs.items()):
                series = []
                for r in rs.values():
                    s = [get(m) for m in r.metrics]
                    series.append([np.nan if v is None else v for v in s])
                n = min(len(s) for s in series)
                arr = np.array([s[:n] for s in series], dtype=float)
                if np.all(np.isnan(arr)):
                    continue
                w = max(1, n // 20)
                mean = np.nanmean(arr, axis=0)
                smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
                ax.plot(np.arange(len(smooth)) + w, smooth, color=f"C{i}", label=strategy, lw=1.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(diag_path, dpi=100)
        plt.close(fig)
        written.append(diag_path)
    return written


def write_csv(agg: dict, path: Path) -> None:
    cols = ["strategy", "seeds", "final_mean", "final_std", "final_per_seed", "initial_mean", "greedy_final_mean",
            "rollouts_to_threshold", "budget_rollouts", "rt_n_reached", "rt_n", "rt_mean_reached", "rt_mean_bounded",
            "ratio_ratio", "ratio_qualifier", "zero_adv_frac", "generated_zero_adv_frac", "weight_min", "weight_max",
            "weight_min_mean", "weight_max_mean", "weight_p10_mean", "weight_p90_mean", "weight_applied", "entropy_mean", "entropy_first10", "entropy_last10",
            "reward_mean", "selected_difficulty", "greso_skipped_mean", "train_seconds"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + ["threshold"])
        for r in agg["rows"]:
            vals = []
            for c in cols:
                v = r.get(c)
                vals.append(" ".join("NR" if x is None else str(x) for x in v) if isinstance(v, list) else v)
            w.writerow(vals + [agg["threshold"]])


def render_markdown(agg: dict, bench: dict, metric: str, command: str, info: dict, timing: dict,
                    images: Sequence[str], config_path: str) -> str:
    tc = _full_config(dict(bench["train"], strategy=agg["baseline"]))
    sp = agg["spearman"]
    lines = [
        "# Rollout efficiency: PREPO vs baselines (issue 5)",
        "",
        *(["**`--quick` smoke test of the harness: a tiny config, NOT evidence.**", ""] if bench.get("is_quick") else []),
        f"Command: `{command}`  ",
        f"Config: `{config_path}` (fixed before measuring); reported seeds {bench['seeds']}; "
        f"seeds used for tuning / development (never reported): {bench['tuning_seeds'] or 'none listed'}.  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info.get('torch', '?')}, Python {info['python']}; "
        f"{tc['num_threads']} torch thread(s) per run, {bench['jobs']} run(s) in parallel.  ",
    ]
    if timing.get("wall_seconds") is not None:
        inv = timing.get("invocations", 1)
        lines.append(f"Wall time of the runs: {timing['wall_seconds'] / 60:.1f} min"
                     + (f" over {inv} invocations (resumed)" if inv > 1 else "") + ".  ")
    lines += [
        f"Setup: built-in arithmetic task, {tc['total_steps']} steps, candidate batch |B| = {tc['candidate_batch_size']}, "
        f"K = {max(1, round(tc['select_ratio'] * tc['candidate_batch_size']))}, G = {tc['group_size']} "
        f"({max(1, round(tc['select_ratio'] * tc['candidate_batch_size'])) * tc['group_size']} rollouts/step except "
        f"dapo_dynamic, which counts every generated rollout), lr {tc['lr']}, eval every {tc['eval_every']} steps. "
        f"Accuracy = `{metric}` on the held-out split "
        + ("(mean accuracy over sampled completions per problem, the paper's avg@k)" if "avg@" in metric
           else "(greedy pass@1)") + ".",
        "",
        markdown_table(agg, metric),
        "",
        f"Ratio = strategy's mean rollouts to reach {agg['baseline']}'s final mean accuracy / {agg['baseline']}'s "
        "(< 1: fewer rollouts; the paper's '1.7x fewer' is a ratio of 0.59). 'Reach' is the first evaluation at or "
        "above the threshold, on a noisy curve evaluated every eval_every steps. A seed that never reaches it counts at its whole rollout budget: '≥' marks a lower "
        f"bound (the strategy missed it on some seed), '~' that {agg['baseline']} itself missed it on some seed. "
        "Zero-adv groups: fraction of groups whose G rewards are all equal (no gradient), among trained groups / "
        "among all generated groups (they differ only for dapo_dynamic, which drops them). Weight range: extremes "
        "of the relative-entropy weights w_i over the whole run, then the mean over steps of each step's min and max "
        "(computed for every strategy, applied only where not noted otherwise). Entropy: mean token entropy of the "
        "trained rollouts, over the run (over its first and last 10% of steps).",
        "",
        *robustness_section(agg, metric),
        "## Prompt perplexity vs pass rate (initial policy)",
        "",
    ]
    if "mean" in sp:
        lines.append(f"Spearman(prompt perplexity, pass rate) = **{sp['mean']:.3f} ± {sp['std']:.3f}** "
                     "(paper: -0.17 to -0.23 on DAPO-Math-17K).")
        lines.append("")
        lines.append("| seed | Spearman | p-value | prompts | samples/prompt | mean pass rate | pass-rate histogram (5 bins 0..1) |")
        lines.append("|---|---|---|---|---|---|---|")
        for k, v in sorted(sp["per_seed"].items()):
            lines.append(f"| {k} | {_fmt_num(v['spearman_ppl_passrate'], '.3f')} | {_fmt_num(v['spearman_pvalue'], '.2g')} | "
                         f"{v['n_prompts']} | {v['samples']} | {_fmt_num(v['pass_rate_mean'], '.3f')} | {v['pass_rate_hist']} |")
    else:
        lines.append("Not measured (spearman_prompts = 0 in the config).")
    lines += ["", "## Findings (read off the numbers)", ""]
    lines += [f"- {s}" for s in findings(agg, metric)]
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    lv = sorted({k for r in agg["rows"] for k in r["levels_final"]})
    if lv:
        lines += ["", "## Final greedy accuracy by difficulty level (%, mean over seeds)", "",
                  "| strategy | " + " | ".join(f"level {k}" for k in lv) + " |", "|---|" + "---|" * len(lv)]
        first = agg["rows"][0]
        if first["levels_initial"]:
            lines.append("| (initial policy) | " + " | ".join(_fmt_pct(first["levels_initial"].get(k)) for k in lv) + " |")
        for r in agg["rows"]:
            lines.append(f"| {r['strategy']} | " + " | ".join(_fmt_pct(r["levels_final"].get(k)) for k in lv) + " |")
    resolved = {k: v for k, v in tc.items() if k not in ("strategy", "seed", "output_dir", "resume", "progress",
                                                          "tensorboard", "cache_dir")}
    lines += ["", "<details><summary>Resolved trainer config (all strategies and seeds; strategy and seed vary)</summary>",
              "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", "", "</details>"]
    lines += ["", f"## Per-seed final {metric} (%)", "",
              "| strategy | initial (mean) | " + " | ".join(f"seed {k}" for k in agg["rows"][0]["seeds"])
              + " | final greedy accuracy (mean) | rollouts budget per seed | train s/run |",
              "|---|---|" + "---|" * (len(agg["rows"][0]["seeds"]) + 3)]
    for r in agg["rows"]:
        lines.append(f"| {r['strategy']} | {_fmt_pct(r['initial_mean'])} | " + " | ".join(_fmt_pct(v) for v in r["final_per_seed"])
                     + f" | {_fmt_pct(r['greedy_final_mean'])} | {', '.join(f'{b:,}' for b in r['budget_rollouts'])} | "
                     f"{_fmt_num(r['train_seconds'], '.0f')} |")
    lines.append("")
    return "\n".join(lines)


def update_readme(readme: Path, table_md: str) -> None:
    text = readme.read_text() if readme.exists() else ""
    block = f"{README_BEGIN}\n{table_md}\n{README_END}"
    if README_BEGIN in text and README_END in text:
        pre, rest = text.split(README_BEGIN, 1)
        _, post = rest.split(README_END, 1)
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n## Rollout efficiency (issue 5)\n\n" + block + "\n"
    readme.write_text(text)


def report(bench: dict, runs_dir: Path, results_dir: Path, command: str, config_path: str,
           timing: Optional[dict] = None, readme: Optional[Path] = None) -> dict:
    metric = bench["metric"]
    runs = load_runs(runs_dir, bench["strategies"], bench["seeds"], metric)
    agg = aggregate(runs, bench["baseline"])
    agg["smoothed"] = aggregate(smoothed_runs(runs, SMOOTH_EVALS), bench["baseline"])
    results_dir.mkdir(parents=True, exist_ok=True)
    png = results_dir / f"{RESULT_STEM}.png"
    diag = results_dir / f"{RESULT_STEM}_diagnostics.png"
    images = plot(runs, agg, metric, png, diag)
    write_csv(agg, results_dir / f"{RESULT_STEM}.csv")
    timing = timing or {}
    info = machine_info()
    md = render_markdown(agg, bench, metric, command, info, timing, [str(p) for p in images], config_path)
    (results_dir / f"{RESULT_STEM}.md").write_text(md)
    (results_dir / f"{RESULT_STEM}.json").write_text(json.dumps(
        {"aggregate": agg, "machine": info, "command": command, "timing": timing, "bench": bench}, indent=1, default=str))
    if readme is not None:
        section = (f"Command: `{command}` on {info['cpu']} ({info['cores']} cores). Full report: "
                   f"`benchmarks/results/{RESULT_STEM}.md`.\n\n" + markdown_table(agg, metric))
        update_readme(readme, section)
    return {"aggregate": agg, "markdown": md, "files": [str(p) for p in images] + [
        str(results_dir / f"{RESULT_STEM}.{e}") for e in ("csv", "md", "json")]}


# ====================================================================== CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG.relative_to(ROOT)), help="benchmark config (YAML)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke version into a temp dir (not the evidence)")
    ap.add_argument("--aggregate-only", action="store_true", help="only aggregate existing runs")
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the config's)")
    ap.add_argument("--runs-dir", default=None, help="where the runs go (default: the config's; --quick: a temp dir)")
    ap.add_argument("--results-dir", default=None, help="where the report goes (default benchmarks/results; --quick: the temp dir)")
    ap.add_argument("--rerun-mismatched", action="store_true", help="delete and rerun runs made with another config")
    ap.add_argument("--update-readme", default=None, metavar="README.md", help="also put the table in this README")
    args = ap.parse_args(argv)

    config_path = Path(args.config)
    if not config_path.is_absolute():
        config_path = ROOT / config_path
    bench = load_bench_config(config_path, quick=args.quick)
    if args.jobs is not None:
        bench["jobs"] = args.jobs
    tmp = Path(tempfile.mkdtemp(prefix="rollout_efficiency_quick_")) if args.quick else None
    runs_dir = Path(args.runs_dir) if args.runs_dir else (tmp / "runs" if args.quick else ROOT / bench["runs_dir"])
    results_dir = Path(args.results_dir) if args.results_dir else (tmp / "results" if args.quick else RESULTS_DIR)
    if args.quick and results_dir.resolve() == RESULTS_DIR.resolve():
        raise SystemExit("--quick must not overwrite the committed results; pick another --results-dir")
    command = "python " + shlex.join(["benchmarks/rollout_efficiency.py"] + list(sys.argv[1:] if argv is None else argv))
    harness_meta = runs_dir / "harness.json"

    timing: dict = {}
    if not args.aggregate_only:
        t0 = time.perf_counter()
        timing = run_all(bench, runs_dir, bench["jobs"], args.rerun_mismatched)
        timing["total_seconds_incl_setup"] = time.perf_counter() - t0
        if timing["run_seconds"]:  # something ran: remember how the runs were made
            if harness_meta.exists():  # a resumed harness: add to what the earlier invocations spent
                prev = json.loads(harness_meta.read_text()).get("timing", {})
                timing["run_seconds"] = {**prev.get("run_seconds", {}), **timing["run_seconds"]}
                timing["wall_seconds"] += prev.get("wall_seconds", 0.0)
                timing["total_seconds_incl_setup"] += prev.get("total_seconds_incl_setup", 0.0)
                timing["invocations"] = prev.get("invocations", 1) + 1
            harness_meta.parent.mkdir(parents=True, exist_ok=True)
            harness_meta.write_text(json.dumps({"command": command, "timing": timing, "jobs": bench["jobs"],
                                                "machine": machine_info(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                                               indent=1))
    if not timing.get("run_seconds") and harness_meta.exists():  # nothing ran now: report how the runs were made
        meta = json.loads(harness_meta.read_text())
        timing = meta.get("timing", {})
        if meta.get("command") and meta["command"] != command:
            command = f"{meta['command']}  (aggregated with: {command})"
    out = report(bench, runs_dir, results_dir, command, str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
                 timing, Path(args.update_readme) if args.update_readme else None)
    print()
    print(markdown_table(out["aggregate"], bench["metric"]))
    print()
    for s in findings(out["aggregate"], bench["metric"]):
        print("- " + s)
    print("\nwrote: " + ", ".join(out["files"]))
    if args.quick:
        print(f"(--quick: a smoke test, not the evidence; runs in {runs_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
