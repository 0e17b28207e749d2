"""The stopping rule of a sequential study (a config's ``sequential:`` section,
:class:`~.config.Sequential`) and where a study stands under it.

Seeds run in the config's order, every strategy of a seed before the next seed, so the finished
runs always hold whole paired seeds. The rule looks at the PRIMARY interval of ``compare`` against
the baseline after ``first`` paired seeds and after every ``block`` more: it stops adding blocks
once that interval is narrower than :data:`~.stats.POWER_WIDTH` (upper - lower in ratio terms: the
distance from no saving, 1, to the paper's 0.59), or when every listed seed has run (the cap).
Until it stops the study is incomplete, and the report says how many seeds are done and needed.
Time per run is read from the runs' own records (steps and evaluations), so resumed runs count
what they spent, not what a harness invocation saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .config import BenchConfig
from .runs import RunData
from .stats import POWER_WIDTH, PairedEstimate, compare, sign_flip_interval


@dataclass
class Look:
    """The rule's look at the first ``seeds`` paired seeds."""

    seeds: int
    ratio: Optional[PairedEstimate]   # compare's PRIMARY ratio against the baseline (None: every seed degenerate)
    n_censored: int
    decision: str                     # stats.decide's words for that interval
    sign_flip: tuple[float, float]    # the sign-flip permutation interval of the ratio (reported, not used)
    stop: str                         # why the rule stops here ('' when it adds a block)

    @property
    def width(self) -> float:
        """Upper - lower end of the ratio's interval; inf without a ratio."""
        return self.ratio.hi - self.ratio.lo if self.ratio is not None else float("inf")


@dataclass
class Status:
    """Where a sequential study stands: ``done`` paired seeds finished (the leading seeds of the
    config's list, every strategy), ``needed`` the seeds the rule asks for now (the next look, or
    the look it stopped at), ``cap`` every listed seed."""

    done: int
    needed: int
    cap: int
    looks: list[Look] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether the rule has stopped."""
        return bool(self.looks) and bool(self.looks[-1].stop)


def paired_seeds_done(runs: Mapping[str, Mapping[int, RunData]], strategies: Sequence[str], seeds: Sequence[int]) -> int:
    """How many of the leading ``seeds`` have a finished run of every strategy."""
    done = 0
    for seed in seeds:
        if not all(seed in runs.get(s, {}) for s in strategies):
            break
        done += 1
    return done


def look(bench: BenchConfig, runs: Mapping[str, Mapping[int, RunData]], n: int) -> Look:
    """The rule's look at the first ``n`` seeds (all finished for compare and the baseline)."""
    seq = bench.sequential
    seeds = bench.seeds[:n]
    c = compare({k: runs[seq.compare][k] for k in seeds}, {k: runs[bench.baseline][k] for k in seeds},
                bench.final_evals, bench.primary, bench.interval)
    flip = ((float("nan"), float("nan")) if c.ratio is None else
            tuple(float(np.exp(b)) for b in sign_flip_interval(np.log(c.ratio.per_seed))))
    width = c.ratio.hi - c.ratio.lo if c.ratio is not None else float("inf")
    stop = (f"interval width {width:.2f} < {POWER_WIDTH:.2f}" if width < POWER_WIDTH else
            f"the cap: every listed seed ran (width {width:.2f})" if n == len(bench.seeds) else "")
    return Look(n, c.ratio, c.n_censored, c.decision, flip, stop)


def status(bench: BenchConfig, runs: Mapping[str, Mapping[int, RunData]]) -> Status:
    """Where the study ``bench`` (with a ``sequential:`` section) stands given its finished
    ``runs`` {strategy: {seed: RunData}}: every look the finished seeds allow, up to the one the
    rule stops at."""
    seq = bench.sequential
    done = paired_seeds_done(runs, bench.strategies, bench.seeds)
    looks: list[Look] = []
    n = seq.first
    while n <= done:
        looks.append(look(bench, runs, n))
        if looks[-1].stop:
            return Status(done, n, len(bench.seeds), looks)
        n += seq.block
    return Status(done, min(n, len(bench.seeds)), len(bench.seeds), looks)


def run_seconds(run: RunData) -> float:
    """A run's training and evaluation seconds from its records: every step's ``time_step``, every
    evaluation's ``time_eval`` and the step-0 evaluation (model loading and restarts excluded)."""
    steps = sum(m.times.get("time_step", 0.0) + (m.eval or {}).get("time_eval", 0.0) for m in run.metrics)
    return float(steps + (run.initial.get("eval") or {}).get("time_eval", 0.0) + run.initial.get("time_spearman", 0.0))
