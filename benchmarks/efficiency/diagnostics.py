"""The "why" numbers of a strategy, from the trainer's typed step records
(:class:`~prepo.metrics.StepMetrics`): zero-advantage groups, relative-entropy weights, entropy,
selected difficulty, reward, GRESO skips, per-level accuracy; what the curriculum selected per
phase of the run (``selection.jsonl``); and the initial policy's Spearman(prompt perplexity, pass
rate) logged in ``initial.json``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from prepo.metrics import StepMetrics

from .runs import RunData

# a step record's value: StepMetrics -> number or None (not logged at that step)
Field = Callable[[StepMetrics], Optional[float]]
PHASES = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0))   # a run's thirds, as fractions of its steps
# a selection.jsonl row's value: the mean over the step's rolled-out prompts, or None when not logged
SELECTION_FIELDS = {
    "ppl": lambda row: _mean(row.get("ppl") or []),                     # prompt perplexity when selected
    "cand_ppl_p50": lambda row: (row.get("cand_ppl") or {}).get("p50"),  # the candidate batch's median
    "pass_rate": lambda row: _mean(row.get("pass_rate") or []),         # mean reward of the group, 0..1
    "level": lambda row: _mean(row.get("levels") or []),
}
SPEARMAN_KEYS = ("spearman_ppl_passrate", "spearman_pvalue", "n_prompts", "samples", "pass_rate_mean", "pass_rate_hist")


def mean_over_steps(metrics: Sequence, get: Callable, frac: tuple = (0.0, 1.0)) -> Optional[float]:
    """Mean of ``get`` over the steps (StepMetrics, or selection.jsonl rows) in the fraction
    ``frac`` of the run (at least one step; None values skipped); None when there is no value."""
    n = len(metrics)
    lo = int(math.floor(frac[0] * n))
    hi = max(int(math.ceil(frac[1] * n)), lo + 1)
    vals = [v for v in map(get, metrics[lo:hi]) if v is not None]
    return float(np.mean(vals)) if vals else None


def generated_zero_adv_frac(metrics: Sequence[StepMetrics]) -> Optional[float]:
    """Fraction of all GENERATED groups whose rewards were all equal. For DAPO dynamic sampling the
    trained groups never are (they were dropped), so this counts the dropped ones."""
    dyn = [m.dynamic or {} for m in metrics]
    generated = sum(d.get("dynamic_groups_generated") or 0 for d in dyn)
    if generated:
        kept = sum(d.get("dynamic_groups_kept") or 0 for d in dyn)   # kept groups are never all-equal
        return (generated - kept) / generated
    return mean_over_steps(metrics, lambda m: m.batch.zero_adv_frac)


@dataclass
class Diagnostics:
    """One strategy's diagnostics: means over its seeds of per-run means over steps (fractions in
    0..1, entropy in nats, difficulty as a level); None where no run logged the value."""

    initial_mean: Optional[float]        # accuracy before training
    greedy_final_mean: Optional[float]   # greedy accuracy at the last evaluation
    zero_adv_frac: Optional[float]       # among trained groups
    generated_zero_adv_frac: Optional[float]   # among all generated groups (differs for dapo_dynamic)
    weight_min: Optional[float]          # extremes of the relative-entropy weights over whole runs
    weight_max: Optional[float]
    weight_min_mean: Optional[float]     # mean over steps of each step's min / max / p10 / p90
    weight_max_mean: Optional[float]
    weight_p10_mean: Optional[float]
    weight_p90_mean: Optional[float]
    weight_applied: Optional[bool]       # whether the strategy applies the weights
    entropy_mean: Optional[float]
    entropy_first10: Optional[float]     # over the first / last 10% of steps
    entropy_last10: Optional[float]
    reward_mean: Optional[float]
    selected_difficulty: Optional[float]
    greso_skipped_mean: Optional[float]  # prompts skipped before rollout per step (greso only)
    train_seconds: Optional[float]       # per run (the last process's, when resumed)
    levels_initial: dict                 # {level: greedy accuracy} before training
    levels_final: dict                   # ... at the last evaluation
    # from selection.jsonl, {SELECTION_FIELDS key: [mean per PHASES third]}; {} when no run logged it
    selection_phases: dict = dataclasses.field(default_factory=dict)
    # the running premise estimate (premise_spearman) per PHASES third; [] when no run logged it
    premise_phases: list = dataclasses.field(default_factory=list)


def premise_spearman(m: StepMetrics) -> Optional[float]:
    """The step's running premise estimate; None when not logged or undefined (NaN)."""
    v = (m.premise or {}).get("premise_spearman")
    return None if v is None or math.isnan(v) else float(v)


def _mean(vals) -> Optional[float]:
    """Mean of the values that are not None; None when there are none."""
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_levels(per_seed: Sequence[dict]) -> dict:
    """{level: mean accuracy over the seeds that logged that level}."""
    keys = sorted({k for d in per_seed for k in d})
    return {k: float(np.mean([d[k] for d in per_seed if k in d])) for k in keys}


def diagnose(runs: Mapping[int, RunData]) -> Diagnostics:
    """The diagnostics of one strategy from its runs {seed: RunData}."""
    mets = [r.metrics for r in runs.values() if r.metrics]

    def avg(get: Field, frac: tuple = (0.0, 1.0)) -> Optional[float]:
        """Mean over seeds of each run's mean over steps."""
        return _mean(mean_over_steps(m, get, frac) for m in mets)

    return Diagnostics(
        initial_mean=_mean(r.initial_acc for r in runs.values()),
        greedy_final_mean=_mean(r.greedy_final for r in runs.values()),
        zero_adv_frac=avg(lambda m: m.batch.zero_adv_frac),
        generated_zero_adv_frac=_mean(generated_zero_adv_frac(m) for m in mets),
        weight_min=min((min(s.batch.weight_min for s in m) for m in mets), default=None),
        weight_max=max((max(s.batch.weight_max for s in m) for m in mets), default=None),
        weight_min_mean=avg(lambda m: m.batch.weight_min),
        weight_max_mean=avg(lambda m: m.batch.weight_max),
        weight_p10_mean=avg(lambda m: m.batch.weight_p10),
        weight_p90_mean=avg(lambda m: m.batch.weight_p90),
        weight_applied=bool(mets[0][0].weight_applied) if mets else None,
        entropy_mean=avg(lambda m: m.batch.entropy_mean),
        entropy_first10=avg(lambda m: m.batch.entropy_mean, (0.0, 0.1)),
        entropy_last10=avg(lambda m: m.batch.entropy_mean, (0.9, 1.0)),
        reward_mean=avg(lambda m: m.batch.reward_mean),
        selected_difficulty=avg(lambda m: m.selected_difficulty),
        greso_skipped_mean=avg(lambda m: (m.selection or {}).get("greso_skipped")),
        train_seconds=_mean(r.summary.get("train_seconds_this_process") for r in runs.values()),
        levels_initial=_mean_levels([r.levels_initial for r in runs.values()]),
        levels_final=_mean_levels([r.levels_final for r in runs.values()]),
        selection_phases=selection_phases(runs),
        premise_phases=([avg(premise_spearman, frac) for frac in PHASES]
                        if any(premise_spearman(m) is not None for ms in mets for m in ms) else []),
    )


def selection_phases(runs: Mapping[int, RunData]) -> dict:
    """What one strategy's curriculum rolled out, by third of the run: {SELECTION_FIELDS key: [mean
    over the seeds that logged selection.jsonl of each run's mean over that third's steps]}; {} when
    none did."""
    logged = [r.selection for r in runs.values() if r.selection]
    if not logged:
        return {}
    return {key: [_mean(mean_over_steps(rows, get, frac) for rows in logged) for frac in PHASES]
            for key, get in SELECTION_FIELDS.items()}


def spearman_summary(runs: Mapping[str, Mapping[int, RunData]]) -> dict:
    """The initial policy's Spearman(prompt PPL, pass rate) per seed, from initial.json: {per_seed:
    {seed: {SPEARMAN_KEYS...}}, mean, std} (mean/std only when logged). The base model and the
    Spearman pool depend only on the seed, so one value per seed."""
    per_seed: dict = {}
    for rs in runs.values():
        for k, r in rs.items():
            if r.initial.get("spearman_ppl_passrate") is not None and k not in per_seed:
                per_seed[k] = {key: r.initial.get(key) for key in SPEARMAN_KEYS}
    vals = np.array([v["spearman_ppl_passrate"] for v in per_seed.values()], dtype=float)
    out: dict = {"per_seed": per_seed}
    if len(vals):
        out.update(mean=float(vals.mean()), std=float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
    return out
