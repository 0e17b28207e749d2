"""The benchmark's pre-registered statistics (issue 5) and the aggregate of all runs.

Seeds are paired: strategy seed s is compared with baseline seed s (same base model, same data).

* A run's *final* accuracy is the mean of its last ``final_evals`` evaluations, and whether a curve
  *reaches* an accuracy is judged on the curve smoothed by the same trailing mean.
* PRIMARY: threshold_s = baseline seed s's final accuracy (``primary: final_threshold``, the toy
  testbeds' rule), or the accuracy of baseline seed s's smoothed curve at its last evaluation within
  half its rollout budget (``half_budget_threshold``: the baseline reaches it by mid-run, so a 0.6x
  saving can show uncensored even when the baseline is still rising at the end); R_X(s) = the cumulative rollouts at X's
  first evaluation whose smoothed accuracy is >= threshold_s, or X's whole rollout budget when it
  never is (*censored*); ratio(s) = R_strategy(s) / R_baseline(s). Estimate: the geometric mean of
  ratio(s) over seeds with a 95% paired-bootstrap CI over seeds (``interval: bootstrap``), or with
  ``interval: t`` the Student t interval of the mean log ratio, exponentiated; a lower bound when a
  strategy seed is censored. A seed whose baseline is at the threshold before training (R = 0 on
  both sides: the ratio is 0 / 0) is left out of the ratio. Decision: 'saves rollouts' when the CI lies below 1, 'costs rollouts' above 1; with
  ``half_budget_threshold`` an inconclusive interval wider than the saving looked for (1 - 0.59, the
  paper's 1.7x) is called underpowered, with the number of seeds and the width.
* SECONDARY: final accuracy, strategy - baseline; area under accuracy vs cumulative rollouts on
  [0, baseline's budget] divided by that budget (a mean accuracy), strategy - baseline. Each
  per-seed paired, mean with a 95% paired-bootstrap CI (or t interval).
* A sign-flip permutation interval of a mean (:func:`sign_flip_interval`) is reported beside the t
  interval where a study registers one, as a check that does not lean on normality.

Accuracies are fractions in 0..1, rollouts are counts of generated completions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import math

import numpy as np

from .config import INTERVALS, PRIMARIES
from .diagnostics import Diagnostics, diagnose, spearman_summary
from .runs import RunData

N_BOOT = 10_000   # bootstrap resamples
BOOT_SEED = 0     # fixed, so a report is reproducible
LEVEL = 0.95      # confidence level of every interval
TOL = 1e-9        # an accuracy within TOL below a threshold counts as reaching it (float means)
PAPER_RATIO = 0.59   # the paper's "1.7x fewer rollouts" as a ratio
# an inconclusive CI wider than this cannot tell no saving (1) from the paper's (0.59): underpowered
POWER_WIDTH = 1 - PAPER_RATIO

Curve = Sequence[tuple[float, float]]   # [(cumulative rollouts, accuracy)], rollouts increasing
# statistic(values, axis) -> values reduced over axis (np.mean, geometric_mean)
Statistic = Callable[..., np.ndarray]


# ---------------------------------------------------------------- one curve
def smooth_curve(curve: Curve, k: int) -> list[tuple[float, float]]:
    """Trailing mean over the last ``k`` evaluations (fewer at the start): the point at x is the
    mean of the accuracies at x and the k - 1 evaluations before it."""
    accs = [a for _, a in curve]
    return [(x, float(np.mean(accs[max(0, i - k + 1): i + 1]))) for i, (x, _) in enumerate(curve)]


def final_accuracy(curve: Curve, k: int) -> float:
    """A run's final accuracy: the mean of its last ``k`` evaluations (all of them when fewer), the
    last point of its smoothed curve."""
    return smooth_curve(curve, k)[-1][1]


def half_budget_accuracy(curve: Curve, k: int, budget: float) -> float:
    """The accuracy of the curve smoothed over ``k`` evaluations at its last point within
    ``budget / 2`` rollouts (its first point when none is)."""
    smoothed = smooth_curve(curve, k)
    within = [a for x, a in smoothed if x <= budget / 2]
    return within[-1] if within else smoothed[0][1]


def rollouts_to_threshold(curve: Curve, threshold: float, tol: float = TOL) -> Optional[float]:
    """Cumulative rollouts at the first point whose accuracy is >= ``threshold - tol``, or None."""
    return next((x for x, acc in curve if acc >= threshold - tol), None)


def rollouts_to_reach(curve: Curve, threshold: float, k: int, budget: float) -> tuple[float, bool]:
    """(R, censored): the rollouts at which the curve smoothed over ``k`` evaluations first reaches
    ``threshold``; ``(budget, True)`` when it never does."""
    r = rollouts_to_threshold(smooth_curve(curve, k), threshold)
    return (budget, True) if r is None else (r, False)


def normalized_auc(curve: Curve, budget: float) -> float:
    """Area under accuracy vs cumulative rollouts from 0 to ``budget`` (trapezoid between the
    points, held constant at the first / last accuracy outside the curve's range), divided by
    ``budget``: a mean accuracy over the budget."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0 rollouts; got {budget}")
    xs = np.array([x for x, _ in curve], dtype=float)
    ys = np.array([a for _, a in curve], dtype=float)
    grid = np.unique(np.concatenate([[0.0, budget], xs[(xs > 0) & (xs < budget)]]))
    return float(np.trapezoid(np.interp(grid, xs, ys), grid) / budget)


# ---------------------------------------------------------------- over seeds
def geometric_mean(values, axis: int = 0) -> np.ndarray:
    """exp(mean(log values)) over ``axis``; values must be > 0."""
    return np.exp(np.mean(np.log(values), axis=axis))


def bootstrap_ci(values, statistic: Statistic = np.mean, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                 level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ``statistic`` over seeds resampled with replacement.

    values: [n_seeds] or [n_seeds, ...] floats, one row per seed (paired quantities already
    combined per seed, so resampling rows is the paired bootstrap). ``statistic(x, axis=1)``
    reduces the resampled [n_boot, n_seeds, ...] array over seeds. Returns (lo, hi), each of
    values' trailing shape (floats for 1-D values)."""
    a = np.asarray(values, dtype=float)
    if a.ndim == 0 or len(a) == 0:
        raise ValueError(f"bootstrap_ci needs one value per seed; got shape {a.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    stats = statistic(a[idx], axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail], axis=0)
    return lo, hi


def t_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The Student t interval (n - 1 degrees of freedom) of the mean of ``values`` [n_seeds];
    (-inf, inf) for one value (no spread to scale it by)."""
    from scipy.stats import t as student_t

    a = np.asarray(values, dtype=float)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"t_interval needs one value per seed; got shape {a.shape}")
    if len(a) == 1:
        return -math.inf, math.inf
    half = float(student_t.ppf(0.5 + level / 2, len(a) - 1)) * float(a.std(ddof=1)) / math.sqrt(len(a))
    return float(a.mean()) - half, float(a.mean()) + half


def sign_flip_pvalue(values, mu: float = 0.0, tol: float = 1e-12) -> float:
    """Exact two-sided p-value of the sign-flip permutation test of mean(values) = ``mu``: the share
    of the 2^n sign patterns s for which |sum(s * (values - mu))| >= |sum(values - mu)|."""
    d = np.asarray(values, dtype=float) - mu
    n = len(d)
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)   # [2^n, n] of +-1
    return float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - tol))


def sign_flip_interval(values, level: float = LEVEL, iters: int = 60) -> tuple[float, float]:
    """The means ``mu`` that the sign-flip test (:func:`sign_flip_pvalue`) does not reject at
    1 - ``level``, each end found by bisection between the sample mean (p = 1) and the data's
    extreme (p = 2 / 2^n). (-inf, inf) when no mean can be rejected: with 2 / 2^n > 1 - level,
    i.e. fewer than 6 values at 95%. At most 20 values (2^n sign patterns are enumerated)."""
    a = np.asarray(values, dtype=float)
    if a.ndim != 1 or not 0 < len(a) <= 20:
        raise ValueError(f"sign_flip_interval needs 1 to 20 values; got shape {a.shape}")
    if 2 / 2 ** len(a) > 1 - level:
        return -math.inf, math.inf

    def edge(inside: float, outside: float) -> float:
        for _ in range(iters):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if sign_flip_pvalue(a, mid) > 1 - level else (inside, mid)
        return inside

    spread = float(np.ptp(a)) or 1.0
    return edge(float(a.mean()), float(a.min()) - 1e-9 * spread), edge(float(a.mean()), float(a.max()) + 1e-9 * spread)


@dataclass
class PairedEstimate:
    """A statistic of per-seed paired values with its paired-bootstrap CI (LEVEL)."""

    per_seed: list[float]
    estimate: float
    lo: float
    hi: float


def paired_estimate(per_seed: Sequence[float], statistic: Statistic = np.mean,
                    interval: str = INTERVALS[0]) -> PairedEstimate:
    """``statistic`` (np.mean or geometric_mean) over the per-seed values, and its CI: the paired
    bootstrap, or with ``interval='t'`` the t interval of the mean (of the logs, exponentiated,
    for the geometric mean)."""
    a = np.asarray(per_seed, dtype=float)
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}; got {interval!r}")
    if interval == "bootstrap":
        lo, hi = bootstrap_ci(a, statistic)
    elif statistic is geometric_mean:
        lo, hi = (math.exp(b) for b in t_interval(np.log(a)))
    else:
        lo, hi = t_interval(a)
    return PairedEstimate([float(v) for v in a], float(statistic(a, axis=0)), float(lo), float(hi))


def decide(ratio: Optional[PairedEstimate], n_censored: int = 0, power_width: Optional[float] = None) -> str:
    """The pre-registered decision from the PRIMARY ratio's CI: 'saves rollouts' (upper bound < 1),
    'costs rollouts' (lower bound > 1), 'inconclusive', or 'n/a' without a ratio. A censored seed
    enters the ratio at its budget, below its true (unknown, larger) value, so with censored seeds
    the upper bound is not one and 'saves rollouts' cannot be read off it: 'inconclusive (censored)'.
    With ``power_width``, an inconclusive CI wider than it adds 'underpowered: n seeds, CI width w'."""
    if ratio is None:
        return "n/a"
    if ratio.lo > 1:
        return "costs rollouts"
    if ratio.hi < 1 and not n_censored:
        return "saves rollouts"
    why = ["censored"] if ratio.hi < 1 else []
    width = ratio.hi - ratio.lo
    if power_width is not None and width > power_width:
        why.append(f"underpowered: {len(ratio.per_seed)} seeds, {int(100 * LEVEL)}% CI width {width:.2f}")
    return "inconclusive" + (f" ({'; '.join(why)})" if why else "")


# ---------------------------------------------------------------- a strategy against the baseline
def baseline_thresholds(base: Mapping[int, RunData], final_evals: int, primary: str = PRIMARIES[0]) -> dict[int, float]:
    """{seed: the accuracy each paired seed must reach}: the baseline seed's final accuracy, or with
    ``primary='half_budget_threshold'`` its smoothed accuracy at half its budget."""
    if primary not in PRIMARIES:
        raise ValueError(f"primary must be one of {', '.join(PRIMARIES)}; got {primary!r}")
    if primary == "half_budget_threshold":
        return {s: half_budget_accuracy(r.curve, final_evals, r.total_rollouts) for s, r in sorted(base.items())}
    return {s: final_accuracy(r.curve, final_evals) for s, r in sorted(base.items())}


def reach_per_seed(runs: Mapping[int, RunData], thresholds: Mapping[int, float],
                   final_evals: int) -> tuple[list[float], list[bool]]:
    """([R(s)], [censored(s)]) over the sorted seeds: each run's rollouts to its seed's threshold."""
    pairs = [rollouts_to_reach(runs[s].curve, thresholds[s], final_evals, runs[s].total_rollouts)
             for s in sorted(runs)]
    return [r for r, _ in pairs], [c for _, c in pairs]


@dataclass
class Comparison:
    """One strategy against the baseline, paired by seed (see the module docstring)."""

    ratio: Optional[PairedEstimate]   # PRIMARY R_strategy/R_baseline, geometric mean; None if every R is 0
    n_censored: int                   # strategy seeds that never reached their threshold
    decision: str                     # decide(ratio, n_censored)
    final_diff: PairedEstimate        # final accuracy, strategy - baseline
    auc_diff: PairedEstimate          # normalized AUC on the baseline's budget, strategy - baseline

    @property
    def lower_bound(self) -> bool:
        """The ratio counts censored seeds at their budget, so it is a lower bound ('>=')."""
        return self.n_censored > 0


def compare(runs: Mapping[int, RunData], base: Mapping[int, RunData], final_evals: int,
            primary: str = PRIMARIES[0], interval: str = INTERVALS[0]) -> Comparison:
    """A strategy's runs {seed: RunData} against the baseline's, on the same seeds, with CIs of
    the kind ``interval`` names."""
    if sorted(runs) != sorted(base):
        raise ValueError(f"seeds are paired: the strategy has seeds {sorted(runs)}, the baseline {sorted(base)}")
    seeds = sorted(base)
    thresholds = baseline_thresholds(base, final_evals, primary)
    reach, censored = reach_per_seed(runs, thresholds, final_evals)
    base_reach, _ = reach_per_seed(base, thresholds, final_evals)   # never censored: its own curve has the value
    # a seed reached at 0 rollouts (its initial policy already there) has no ratio: left out of it
    defined = [(r, b) for r, b in zip(reach, base_reach) if r > 0 and b > 0]
    ratio = paired_estimate([r / b for r, b in defined], geometric_mean, interval) if defined else None
    budgets = [base[s].total_rollouts for s in seeds]
    return Comparison(
        ratio=ratio,
        n_censored=sum(censored),
        decision=decide(ratio, sum(censored), None if primary == PRIMARIES[0] else POWER_WIDTH),
        # against the baseline's final accuracy, which is the threshold only under the final_threshold primary
        final_diff=paired_estimate([final_accuracy(runs[s].curve, final_evals) - final_accuracy(base[s].curve, final_evals)
                                    for s in seeds], interval=interval),
        auc_diff=paired_estimate([normalized_auc(runs[s].curve, b) - normalized_auc(base[s].curve, b)
                                  for s, b in zip(seeds, budgets)], interval=interval),
    )


# ---------------------------------------------------------------- every strategy
@dataclass
class StrategyResult:
    """One strategy's row of the report."""

    strategy: str
    seeds: list[int]
    finals: list[float]          # final accuracy per seed
    final_mean: float
    final_std: float             # over seeds (ddof 1; 0 for one seed)
    budgets: list[int]           # total rollouts per seed
    reach: list[float]           # rollouts to reach the paired baseline seed's final accuracy (budget if censored)
    censored: list[bool]
    comparison: Optional[Comparison]   # None for the baseline itself
    diagnostics: Diagnostics


@dataclass
class Aggregate:
    """Everything the report shows."""

    baseline: str
    final_evals: int
    thresholds: dict[int, float]   # {seed: the accuracy to reach (the baseline's final, or half-budget, accuracy)}
    degenerate_seeds: list[int]    # seeds where the baseline's initial policy is already at the threshold
    rows: list[StrategyResult]     # the baseline first
    spearman: dict                 # diagnostics.spearman_summary
    primary: str = PRIMARIES[0]    # the threshold rule (config.PRIMARIES)
    missing: list[str] = field(default_factory=list)   # runs not (yet) finished: '<strategy>/seed<k>: why'
    interval: str = INTERVALS[0]   # the kind of every CI (config.INTERVALS)
    interim: bool = False          # a sequential study whose rule has not stopped: no decision yet


def aggregate(runs: Mapping[str, Mapping[int, RunData]], baseline: str, final_evals: int = 1,
              primary: str = PRIMARIES[0], missing: Sequence[str] = (), interval: str = INTERVALS[0]) -> Aggregate:
    """The aggregate of {strategy: {seed: RunData}} against ``baseline``, CIs of the kind ``interval``. A strategy may lack some of
    the baseline's seeds (runs not finished yet, listed in ``missing``): it is compared on the seeds
    it has; a seed the baseline lacks cannot be paired and must not be there."""
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} has no runs")
    base = runs[baseline]
    unpaired = [f"{s}/seed{k}" for s, rs in runs.items() for k in rs if k not in base]
    if unpaired:
        raise ValueError(f"runs {unpaired} have no {baseline} run of the same seed to pair with")
    thresholds = baseline_thresholds(base, final_evals, primary)
    base_reach, _ = reach_per_seed(base, thresholds, final_evals)
    rows = []
    for strategy in [baseline] + [s for s in runs if s != baseline and runs[s]]:
        rs = runs[strategy]
        seeds = sorted(rs)
        finals = [final_accuracy(rs[s].curve, final_evals) for s in seeds]
        reach, censored = reach_per_seed(rs, thresholds, final_evals)
        rows.append(StrategyResult(
            strategy=strategy, seeds=seeds, finals=finals, final_mean=float(np.mean(finals)),
            final_std=float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
            budgets=[rs[s].total_rollouts for s in seeds], reach=reach, censored=censored,
            comparison=None if strategy == baseline else compare(rs, {k: base[k] for k in rs}, final_evals, primary,
                                                                 interval),
            diagnostics=diagnose(rs)))
    return Aggregate(baseline, final_evals, thresholds, [s for s, r in zip(sorted(base), base_reach) if r == 0],
                     rows, spearman_summary(runs), primary, list(missing), interval)


def curve_band(curves: Sequence[Curve], n_points: int = 101,
               minus: Optional[Sequence[Curve]] = None) -> tuple[np.ndarray, ...]:
    """(x, mean, lo, hi) of several seeds' curves on a common grid of ``n_points`` rollout counts
    (linear interpolation, over the range every curve covers): the mean over seeds and its
    bootstrap CI over seeds, each [n_points]. With ``minus`` (the baseline's curves, one per seed in
    the same order) each seed's curve minus its baseline curve: the paired difference."""
    every = list(curves) + list(minus or [])
    x = np.linspace(max(c[0][0] for c in every), min(c[-1][0] for c in every), n_points)

    def on_grid(cs: Sequence[Curve]) -> np.ndarray:
        return np.array([np.interp(x, [p[0] for p in c], [p[1] for p in c]) for c in cs])

    ys = on_grid(curves) - (on_grid(minus) if minus is not None else 0.0)
    lo, hi = bootstrap_ci(ys)
    return x, ys.mean(axis=0), lo, hi
