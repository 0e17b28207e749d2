"""A run's outputs: metrics.jsonl / eval.jsonl / selection.jsonl (one record a line), TensorBoard
scalars, the tqdm bar, config.yaml, summary.json and the accuracy-vs-rollouts plot. Everything here reads the
:class:`~prepo.metrics.StepMetrics` record or the files written from it."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from .config import TrainConfig
from .errors import RunDirError
from .metrics import PREPO_OVERHEAD_KEYS, TIME_KEYS, StepMetrics


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of ``path`` (what a checkpoint had seen), drop the rest."""
    if not path.exists():
        if n:
            raise RunDirError(f"{path} is missing but the checkpoint expects {n} lines in it")
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) < n:
        raise RunDirError(f"{path} has {len(lines)} lines, the checkpoint expects {n}")
    path.write_text("".join(lines[:n]))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rounded(values: Optional[Sequence[float]]) -> Optional[list[float]]:
    """Floats to 4 decimals (the rows stay small); None stays None."""
    return None if values is None else [round(float(v), 4) for v in values]


def selection_row(rho: float, prompt_ids: Optional[Sequence[int]], levels: Sequence[Optional[int]],
                  pass_rates: Sequence[float], ppl: Optional[Sequence[float]] = None,
                  cand_ppl: Optional[np.ndarray] = None) -> dict:
    """One step's selection.jsonl row (the step number is added when written): the curriculum
    position ``rho`` and the rolled-out prompts in selection order -- their train-set indices
    (None for dynamic sampling, whose refills are not indexed), difficulty levels (None when the data
    has none), prompt perplexities under the policy that selected them (None when the strategy does
    not score prompts) and their groups' pass rates (mean reward, 0..1) -- and the p10/p50/p90
    perplexity of the whole candidate batch (None without scores)."""
    q = None if cand_ppl is None else dict(zip(("p10", "p50", "p90"), _rounded(np.percentile(cand_ppl, [10, 50, 90]))))
    return {"rho": round(float(rho), 6), "prompt_ids": None if prompt_ids is None else [int(i) for i in prompt_ids],
            "levels": list(levels) if any(v is not None for v in levels) else None, "ppl": _rounded(ppl),
            "pass_rate": _rounded(pass_rates), "cand_ppl": q}


def _append_jsonl(path: Path, obj: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


class RunLog:
    """Where each step's record goes: metrics.jsonl, selection.jsonl (the prompts it rolled out, one
    row per metrics row), TensorBoard (when installed and asked for) and the progress bar. Disabled
    (every method does nothing) on data-parallel ranks other than 0."""

    def __init__(self, out: Path, cfg: TrainConfig, *, enabled: bool = True):
        self.out, self.cfg, self.enabled = out, cfg, enabled
        self.metrics_path = out / "metrics.jsonl"
        self.eval_path = out / "eval.jsonl"
        self.selection_path = out / "selection.jsonl"
        self.tb = self.bar = None
        self.last_eval: Optional[float] = None

    def start_fresh(self) -> None:
        """A new run: clear old records, save the config."""
        if not self.enabled:
            return
        for p in (self.metrics_path, self.eval_path, self.selection_path):
            if p.exists():
                p.unlink()
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def truncate(self, metrics_lines: int, eval_lines: int) -> None:
        """Back to what a checkpoint had seen (resume). selection.jsonl has a row per metrics.jsonl row
        (absent in runs from before it was written: they resume without the earlier rows)."""
        if self.enabled:
            truncate_lines(self.metrics_path, metrics_lines)
            truncate_lines(self.eval_path, eval_lines)
            if self.selection_path.exists():
                truncate_lines(self.selection_path, metrics_lines)

    def open(self, step: int, *, resumed: bool, initial: dict) -> None:
        if not self.enabled:
            return
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=step + 1 if resumed else None)
            except ImportError:
                self.tb = None
        evals = read_jsonl(self.eval_path)
        self.last_eval = evals[-1]["accuracy"] if evals else initial.get("eval", {}).get("accuracy")
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.cfg.total_steps, initial=step, desc=f"prepo[{self.cfg.strategy}]",
                            dynamic_ncols=True, file=sys.stderr)

    def write_eval(self, row: dict) -> None:
        if not self.enabled:
            return
        _append_jsonl(self.eval_path, row)
        self.last_eval = row["accuracy"]

    def write_step(self, m: StepMetrics) -> None:
        if not self.enabled:
            return
        _append_jsonl(self.metrics_path, m.to_dict())
        if m.picked is not None:
            _append_jsonl(self.selection_path, {"step": m.step, **m.picked})
        if self.tb is not None:
            for k, v in m.scalars().items():
                self.tb.add_scalar(k, v, m.step)
        if self.bar is not None:
            self.bar.update(1)
            premise = (m.premise or {}).get("premise_spearman")
            self.bar.set_postfix(rollouts=m.rollouts, reward=f"{m.reward_mean:.2f}",
                                 acc="-" if self.last_eval is None else f"{self.last_eval:.3f}",
                                 **({} if premise is None else {"premise": f"{premise:+.2f}"}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def write_summary(out: Path, cfg: TrainConfig, *, steps: int, rollouts: int, reward_failures: int, initial: dict,
                  seconds: float, resumed_from: Optional[int]) -> dict:
    """summary.json (returned): accuracy curve, rollouts, time split, skipped data rows, ..."""
    metrics = [StepMetrics.from_dict(r) for r in read_jsonl(out / "metrics.jsonl")]
    evals = read_jsonl(out / "eval.jsonl")
    split = {k: float(sum(m.times.get(k, 0.0) for m in metrics)) for k in TIME_KEYS + ("time_step",)}
    step_total = split["time_step"] or 1.0
    k = cfg.eval_avg_k
    plot_path = plot_curve(evals, out / "accuracy_vs_rollouts.png", cfg.strategy)
    summary = {
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "steps": steps,
        "rollouts": rollouts,
        "initial_accuracy": evals[0]["accuracy"] if evals else None,
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "curve": [(e["rollouts"], e["accuracy"]) for e in evals],
        "avg_k": k,
        "initial_avg_k": evals[0].get(f"avg@{k}") if evals else None,
        "final_avg_k": evals[-1].get(f"avg@{k}") if evals else None,
        "spearman_ppl_passrate": initial.get("spearman_ppl_passrate"),
        "reward_failures": reward_failures,
        "data": initial.get("data", {}),
        "time_split_seconds": split,
        "time_split_frac": {key: split[key] / step_total for key in TIME_KEYS},
        "prepo_overhead_frac": sum(split[key] for key in PREPO_OVERHEAD_KEYS) / step_total,
        "train_seconds_this_process": seconds,
        "warmup_seconds": initial.get("warmup_seconds", 0.0),
        "resumed_from_step": resumed_from,
        "output_dir": str(out),
        "metrics": str(out / "metrics.jsonl"),
        "plot": str(plot_path) if plot_path else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot_curve(evals: list[dict], path: Path, label: str) -> Optional[Path]:
    if not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [e["rollouts"] for e in evals]
    ax.plot(xs, [e["accuracy"] for e in evals], marker="o", label=f"{label}: greedy")
    for key in sorted({k for e in evals for k in e if k.startswith("avg@")}):
        pts = [(e["rollouts"], e[key]) for e in evals if key in e]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", label=f"{label}: {key}")
    ax.set_xlabel("cumulative rollouts")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
