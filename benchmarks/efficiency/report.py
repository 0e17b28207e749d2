"""The report of one benchmark: ``<results_dir>/<stem>.md`` (primary table first, then
diagnostics, Spearman, what the curriculum selected, plots, per-level and per-seed tables; the runs
not finished yet listed as missing), ``<stem>.csv`` (a row per
strategy), ``<stem>.json`` (everything), ``<stem>.png`` (accuracy vs rollouts, mean over seeds with
a 95% bootstrap band), ``<stem>_diagnostics.png``, and optionally the primary table in a README
between ``<!-- <stem>:begin -->`` and ``<!-- <stem>:end -->``."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from .config import PRIMARIES, ROOT, BenchConfig, report_config
from .runner import machine_info
from .runs import load_finished
from .sequential import Status, run_seconds, status
from .stats import (LEVEL, N_BOOT, PAPER_RATIO, POWER_WIDTH, Aggregate, PairedEstimate, StrategyResult, aggregate,
                    curve_band)


# ---------------------------------------------------------------- formatting
def _pct(x: Optional[float]) -> str:
    """An accuracy (0..1) in percent."""
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: Optional[float], fmt: str = ".2f") -> str:
    """A number in ``fmt``; '-' for None or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ratio(r: StrategyResult) -> str:
    """'≥0.85 [0.70, 1.02]', '1 (reference)' or 'n/a'."""
    c = r.comparison
    if c is None:
        return "1 (reference)"
    if c.ratio is None:
        return "n/a"
    return f"{'≥' if c.lower_bound else ''}{c.ratio.estimate:.2f} [{c.ratio.lo:.2f}, {c.ratio.hi:.2f}]"


def _diff_pts(e: Optional[PairedEstimate]) -> str:
    """A difference of accuracies in percentage points with its CI."""
    return "-" if e is None else f"{100 * e.estimate:+.1f} [{100 * e.lo:+.1f}, {100 * e.hi:+.1f}]"


def _rel(path: Path) -> str:
    """``path`` relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _target(agg: Aggregate) -> str:
    """What each seed must reach, in a table's words."""
    return f"{agg.baseline}'s " + ("final" if agg.primary == PRIMARIES[0] else "half-budget accuracy")


# ---------------------------------------------------------------- tables
def primary_table(agg: Aggregate, metric: str) -> str:
    """The pre-registered result: a row per strategy, the baseline first."""
    base, pct = agg.baseline, int(100 * LEVEL)
    lines = [f"| strategy | rollouts to reach {_target(agg)}, ratio vs {base} (geo-mean [{pct}% CI]) | censored seeds | "
             f"decision | final {metric} diff, pts [{pct}% CI] | AUC diff, pts [{pct}% CI] | final {metric} % (mean ± std) |",
             "|---|---|---|---|---|---|---|"]
    for r in agg.rows:
        c = r.comparison
        decision = "reference" if c is None else c.decision + (" (interim)" if agg.interim else "")
        lines.append(f"| {r.strategy} | {_ratio(r)} | {sum(r.censored)}/{len(r.seeds)} | "
                     f"{decision} | {_diff_pts(c and c.final_diff)} | "
                     f"{_diff_pts(c and c.auc_diff)} | {_pct(r.final_mean)} ± {_pct(r.final_std)} |")
    return "\n".join(lines)


def protocol_note(agg: Aggregate) -> str:
    """How to read the primary table."""
    k, base = agg.final_evals, agg.baseline
    final = "its last evaluation" if k == 1 else f"the mean of its last {k} evaluations"
    target = (f"{base} seed s's final accuracy" if agg.primary == PRIMARIES[0] else
              f"the accuracy {base} seed s's curve" + ("" if k == 1 else f" (trailing mean over {k} evaluations)")
              + f" has at its last evaluation within half its rollout budget, which {base} reaches by mid-run")
    note = (f"A run's final accuracy is {final}. Seeds are paired: strategy seed s must reach {target}; R(s) is "
            "the cumulative rollouts at the first evaluation where the strategy's curve"
            + ("" if k == 1 else f" (trailing mean over {k} evaluations)")
            + " reaches it, or the strategy's whole budget when it never does (censored: the ratio is then a lower "
            f"bound, '≥'). Ratio = geometric mean over seeds of R_strategy(s) / R_{base}(s) (< 1: fewer rollouts; the "
            f"paper's '1.7x fewer' is 0.59). CIs: " + (
                f"paired bootstrap over seeds ({N_BOOT:,} resamples, fixed RNG seed, percentile interval)"
                if agg.interval == "bootstrap" else
                "Student t intervals over seeds (n - 1 degrees of freedom): of the mean log ratio, exponentiated, "
                "for the ratio; of the mean paired difference for the secondaries") + ". Decision: 'saves rollouts' when the ratio's CI lies below 1 and no seed is "
            "censored (a censored seed enters at its budget, below its true ratio, so the CI's upper end is then no "
            "bound: 'inconclusive (censored)'), 'costs rollouts' when it lies above 1, else inconclusive"
            + ("" if agg.primary == PRIMARIES[0] else
               f"; an inconclusive CI wider than {POWER_WIDTH:.2f} (the distance from no saving, 1, to the paper's "
               f"{PAPER_RATIO}) is reported as underpowered, with its number of seeds and width")
            + f". Final diff: final accuracy, strategy - {base}, per seed. AUC diff: area under "
            f"accuracy vs cumulative rollouts on [0, {base}'s budget] divided by that budget (a mean accuracy; a curve "
            f"is held at its last value past its end), strategy - {base}, per seed.")
    if agg.degenerate_seeds:
        reached = "final accuracy" if agg.primary == PRIMARIES[0] else "accuracy at half its budget"
        note += (f"\n\n**Degenerate on seed(s) {agg.degenerate_seeds}:** {base}'s {reached} does not exceed its "
                 "initial accuracy there (training did not improve on the base policy), so it is reached at 0 rollouts "
                 "and the ratio is 0 / 0 there: those seeds are left out of the ratio (n/a when every seed is), "
                 "the secondaries keep them.")
    return note


def diagnostics_table(agg: Aggregate) -> str:
    """The "why" numbers per strategy (means over seeds)."""
    lines = ["| strategy | zero-adv groups % (trained / generated) | weight range min..max (per-step mean) | "
             "weight p10 / p90 (mean) | mean entropy (first→last 10%) | selected difficulty | mean reward | "
             "GRESO skipped / step |", "|---|---|---|---|---|---|---|---|"]
    for r in agg.rows:
        d = r.diagnostics
        weights = (f"{_num(d.weight_min)}..{_num(d.weight_max)} ({_num(d.weight_min_mean)}..{_num(d.weight_max_mean)})"
                   + ("" if d.weight_applied else ", not applied"))
        lines.append(f"| {r.strategy} | {_pct(d.zero_adv_frac)} / {_pct(d.generated_zero_adv_frac)} | {weights} | "
                     f"{_num(d.weight_p10_mean)} / {_num(d.weight_p90_mean)} | {_num(d.entropy_mean, '.3f')} "
                     f"({_num(d.entropy_first10, '.3f')}→{_num(d.entropy_last10, '.3f')}) | {_num(d.selected_difficulty)} | "
                     f"{_num(d.reward_mean, '.3f')} | {_num(d.greso_skipped_mean)} |")
    return "\n".join(lines)


DIAGNOSTICS_NOTE = (
    "Zero-adv groups: groups whose G rewards are all equal (no gradient), among trained / among all generated "
    "groups (they differ only for dapo_dynamic, which drops them; their rollouts still count). Weights: the "
    "relative-entropy weights w_i, computed for every strategy and applied where not noted otherwise: extremes over "
    "whole runs, then means over steps of each step's min, max, 10th and 90th percentile (paper: mostly 0.7-1.5). "
    "Entropy: mean token entropy (nats) of the trained rollouts over the run (its first and last 10% of steps).")


def spearman_section(agg: Aggregate, base_report: Optional[Path] = None) -> list[str]:
    """The initial policy's Spearman(prompt perplexity, pass rate), per seed; without it, a pointer
    to ``base_report`` (benchmarks/testbed_properties.py's measurement of the base policy) if it exists."""
    sp = agg.spearman
    if "mean" not in sp:
        if base_report is not None and base_report.exists():
            return [f"Not measured by the runs (spearman_prompts = 0): measured once on the base policy, with "
                    f"the other base-policy properties, in [{base_report.name}]({base_report.name})."]
        return ["Not measured (spearman_prompts = 0 in the config)."]
    lines = [f"Spearman(prompt perplexity, pass rate) = **{sp['mean']:.3f} ± {sp['std']:.3f}** "
             "(paper: -0.17 to -0.23 on DAPO-Math-17K).", "",
             "| seed | Spearman | p-value | prompts | samples/prompt | mean pass rate | pass-rate histogram (5 bins 0..1) |",
             "|---|---|---|---|---|---|---|"]
    for k, v in sorted(sp["per_seed"].items()):
        lines.append(f"| {k} | {_num(v['spearman_ppl_passrate'], '.3f')} | {_num(v['spearman_pvalue'], '.2g')} | "
                     f"{v['n_prompts']} | {v['samples']} | {_num(v['pass_rate_mean'], '.3f')} | {v['pass_rate_hist']} |")
    return lines


def levels_table(agg: Aggregate) -> list[str]:
    """Greedy accuracy by difficulty level at the end (and before training), when logged."""
    levels = sorted({k for r in agg.rows for k in r.diagnostics.levels_final})
    if not levels:
        return []
    lines = ["## Final greedy accuracy by difficulty level (%, mean over seeds)", "",
             "| strategy | " + " | ".join(f"level {k}" for k in levels) + " |", "|---|" + "---|" * len(levels)]
    first = agg.rows[0].diagnostics.levels_initial
    if first:
        lines.append("| (initial policy) | " + " | ".join(_pct(first.get(k)) for k in levels) + " |")
    for r in agg.rows:
        lines.append(f"| {r.strategy} | " + " | ".join(_pct(r.diagnostics.levels_final.get(k)) for k in levels) + " |")
    return lines + [""]


def per_seed_table(agg: Aggregate, metric: str) -> list[str]:
    """Final accuracy and rollouts-to-reach per seed: the numbers behind the primary table ('missing'
    where a run has not finished)."""
    seeds = agg.rows[0].seeds
    lines = [f"## Per seed: final {metric} % / rollouts to reach {_target(agg)}", "",
             f"Thresholds ({_target(agg)}, %): " + ", ".join(f"seed {s} {_pct(t)}" for s, t in agg.thresholds.items())
             + ".", "",
             "| strategy | initial % (mean) | " + " | ".join(f"seed {s}" for s in seeds)
             + " | greedy final % (mean) | rollout budget per seed | train s/run |",
             "|---|---|" + "---|" * (len(seeds) + 3)]
    for r in agg.rows:
        cell = {k: f"{_pct(f)} / " + (f"not reached (≥{x:,.0f})" if c else f"{x:,.0f}")
                for k, f, x, c in zip(r.seeds, r.finals, r.reach, r.censored)}
        cells = [cell.get(k, "missing") for k in seeds]
        d = r.diagnostics
        lines.append(f"| {r.strategy} | {_pct(d.initial_mean)} | " + " | ".join(cells)
                     + f" | {_pct(d.greedy_final_mean)} | {', '.join(f'{b:,}' for b in r.budgets)} | "
                     f"{_num(d.train_seconds, '.0f')} |")
    return lines + [""]


SELECTION_NOTE = (
    "From each run's selection.jsonl: per third of the run, the mean over steps of the rolled-out prompts' "
    "perplexity under the policy that selected them, the candidate batch's median perplexity (where in the "
    "sorted batch a window picked), the share of correct rollouts in their groups, and their difficulty "
    "level. Strategies that do not score prompts (random, entropy_only, dapo_dynamic, greso) log no perplexity (-).")


def selection_table(agg: Aggregate) -> list[str]:
    """What each strategy's curriculum rolled out, by third of the run (when selection.jsonl was logged)."""
    rows = [r for r in agg.rows if r.diagnostics.selection_phases]
    if not rows:
        return []
    lines = ["## What the curriculum rolled out, by third of the run (means over seeds)", "",
             "| strategy | selected prompt ppl (1st / 2nd / 3rd) | candidate batch median ppl | group pass rate % | "
             "level |", "|---|---|---|---|---|"]
    for r in rows:
        ph = r.diagnostics.selection_phases
        thirds = lambda key, fmt: " / ".join(map(fmt, ph[key]))  # noqa: E731
        lines.append(f"| {r.strategy} | {thirds('ppl', _num)} | {thirds('cand_ppl_p50', _num)} | "
                     f"{thirds('pass_rate', _pct)} | {thirds('level', _num)} |")
    return lines + ["", SELECTION_NOTE, ""]


def missing_section(missing: Sequence[str]) -> list[str]:
    """The runs the report lacks (not finished yet), when any."""
    if not missing:
        return []
    return [f"**Incomplete: {len(missing)} run(s) missing; every table covers the finished runs only.**", "",
            *[f"- {m}" for m in missing], ""]


# ---------------------------------------------------------------- a sequential study
def _bounds(lo: float, hi: float) -> str:
    """'[0.52, 1.31]', or 'unbounded' for an interval with an infinite or zero end."""
    return f"[{lo:.2f}, {hi:.2f}]" if 0 < lo and math.isfinite(hi) else "unbounded"


def rule_note(bench: BenchConfig) -> str:
    """The sequential rule in words."""
    seq, base = bench.sequential, bench.baseline
    return (f"Seeds run in the listed order, every strategy of a seed before the next seed, so a partial study holds "
            f"whole paired seeds. The rule looks at {seq.compare} against {base} after {seq.first} paired seeds and "
            f"after every {seq.block} more, up to {len(bench.seeds)}: it stops adding seeds once the PRIMARY interval is "
            f"narrower than {POWER_WIDTH:.2f} (upper - lower, in ratio terms: the distance from no saving, 1, to the "
            f"paper's {PAPER_RATIO}), or at that cap. The sign-flip permutation interval of the mean log ratio is shown "
            "beside it as a check that does not lean on normality; it decides nothing (below 6 seeds it is unbounded).")


def control_line(bench: BenchConfig, st: Status, agg: Aggregate) -> list[str]:
    """What the positive control shows, when the study names one and it has paired seeds."""
    seq = bench.sequential
    row = next((r for r in agg.rows if r.strategy == seq.control), None) if seq.control else None
    if row is None:
        return []
    c = row.comparison
    line = (f"Positive control `{seq.control}` against {bench.baseline} on {len(row.seeds)} paired seeds: "
            f"{_ratio(row)}, {c.decision}")
    if not st.complete:
        return [line + " (interim).", ""]
    if c.decision != "saves rollouts":
        line += (". Even the control shows no saving at this many seeds: the harness (seed-to-seed spread, "
                 "evaluation noise, run length) limits what this study can show, not only the method")
    return [line + ".", ""]


def status_section(bench: BenchConfig, st: Status, agg: Optional[Aggregate]) -> list[str]:
    """Where the sequential study stands, its looks, and the positive control."""
    seq = bench.sequential
    if st.complete:
        head = f"**Complete: the rule stopped at {st.needed} paired seeds ({st.looks[-1].stop}).**"
    else:
        head = (f"**Incomplete: {st.done} of {st.needed} paired seeds done** (seeds {bench.seeds[:st.needed]}; the "
                f"rule's next look is at {st.needed} seeds, at most {st.cap}). Every number below is interim: no "
                "decision is read from it until the rule stops.")
    lines = ["## The sequential rule", "", head, "", rule_note(bench), ""]
    if st.looks:
        lines += [f"| look: paired seeds | {seq.compare} / {bench.baseline} ratio [{int(100 * LEVEL)}% CI] | CI width | "
                  f"sign-flip {int(100 * LEVEL)}% interval | censored seeds | decision at this look | the rule |",
                  "|---|---|---|---|---|---|---|"]
        for lk in st.looks:
            ratio = "n/a" if lk.ratio is None else (f"{'≥' if lk.n_censored else ''}{lk.ratio.estimate:.2f} "
                                                    f"{_bounds(lk.ratio.lo, lk.ratio.hi)}")
            lines.append(f"| {lk.seeds} | {ratio} | {lk.width:.2f} | {_bounds(*lk.sign_flip)} | {lk.n_censored} | "
                         f"{lk.decision} | {lk.stop or 'add a block'} |")
        lines.append("")
    return lines + (control_line(bench, st, agg) if agg is not None else [])


def time_section(bench: BenchConfig, runs: dict) -> list[str]:
    """Minutes per run (training and evaluation, from the runs' records) by seed, each block's sum,
    and the means a next study is sized from."""
    strategies = [s for s in bench.strategies if s in runs]
    block = bench.sequential.block if bench.sequential else len(bench.seeds)
    minutes = {(s, k): run_seconds(r) / 60 for s in strategies for k, r in runs[s].items()}
    blocks: dict[int, list[int]] = {}
    for k in bench.seeds:
        if any((s, k) in minutes for s in strategies):
            blocks.setdefault(bench.seeds.index(k) // block, []).append(k)
    if not minutes:
        return []
    lines = ["## Time per run and per block (minutes)", "",
             "Training steps and evaluations as each run recorded them (model loading and restarts not included).", "",
             "| seed | " + " | ".join(strategies) + " | all strategies |", "|---|" + "---|" * (len(strategies) + 1)]
    whole = []   # the totals of blocks with every run finished
    for mine in blocks.values():
        for k in mine:
            cells = [minutes.get((s, k)) for s in strategies]
            lines.append(f"| {k} | " + " | ".join(_num(c, ".1f") for c in cells) + f" | {sum(c or 0 for c in cells):.1f} |")
        per = [sum(minutes.get((s, k), 0.0) for k in mine) for s in strategies]
        lines.append(f"| **block {mine[0]}-{mine[-1]}** | " + " | ".join(f"{m:.1f}" for m in per) + f" | **{sum(per):.1f}** |")
        if len(mine) == block and all((s, k) in minutes for s in strategies for k in mine):
            whole.append(sum(per))
    lines += ["", f"Mean per run {np.mean(list(minutes.values())):.1f} min ({len(minutes)} runs)"
              + (f"; per whole block of {block} seeds x {len(strategies)} strategies {np.mean(whole):.0f} min "
                 f"({len(whole)} blocks)" if whole else "") + ".", ""]
    return lines


PREMISE_NOTE = (
    "premise_spearman of each step: Spearman(perplexity rank within the candidate batch, group pass rate) over the "
    "prompts rolled out in the last premise_window_steps steps; the mean over the steps of each third, then over seeds. "
    "Negative is the paper's premise (lower perplexity, easier prompt). Without premise probes only the window's "
    "band of perplexity is seen, and that band moves with training, so this running estimate is descriptive.")


def premise_table(agg: Aggregate) -> list[str]:
    """The running premise estimate by third of the run, for the strategies that log it."""
    rows = [r for r in agg.rows if r.diagnostics.premise_phases]
    if not rows:
        return []
    lines = ["## The premise while training, by third of the run (means over seeds)", "",
             "| strategy | premise_spearman (1st / 2nd / 3rd) |", "|---|---|"]
    lines += [f"| {r.strategy} | {' / '.join(_num(v, '+.3f') for v in r.diagnostics.premise_phases)} |" for r in rows]
    return lines + ["", PREMISE_NOTE, ""]


# ---------------------------------------------------------------- the markdown
def header(bench: BenchConfig, command: str, config_path: str, info: dict, timing: dict,
           seeds_needed: Optional[int] = None) -> list[str]:
    """Title, description, how and where the runs were made (of the runs of the first
    ``seeds_needed`` seeds, default all), the setup."""
    tc = report_config(bench)
    k_prompts = max(1, round(tc["select_ratio"] * tc["candidate_batch_size"]))
    lines = [f"# {bench.title}", ""]
    lines += [bench.description, ""] if bench.description else []
    lines += ["**`--quick` smoke test of the harness: a tiny config, NOT evidence.**", ""] if bench.is_quick else []
    lines += [f"Command: `{command}`  ",
              f"Config: `{config_path}` (fixed before measuring); reported seeds {bench.seeds}; seeds used for tuning / "
              f"development (never reported): {bench.tuning_seeds or 'none listed'}.  ",
              f"Machine: {info['cpu']}, {info['cores']} cores, torch {info.get('torch', '?')}, Python {info['python']}; "
              f"{tc['num_threads']} torch thread(s) per run, {bench.jobs} run(s) in parallel.  "]
    if timing.get("wall_seconds") is not None:
        inv, timed = timing.get("invocations", 1), len(timing.get("run_seconds", {}))
        planned = len(bench.strategies) * (seeds_needed or len(bench.seeds))
        lines.append(f"Wall time of the runs: {timing['wall_seconds'] / 60:.1f} min"
                     + (f" over {inv} invocations (resumed)" if inv > 1 else "")
                     + (f", covering {timed} of the {planned} runs (the others ran in invocations that were "
                        "interrupted, which record no wall time; each run's training time is in the per-seed table)"
                        if 0 < timed < planned else "") + ".  ")
    lines += [f"Setup: task `{tc.get('task') or 'arithmetic'}`, {tc['total_steps']} steps, candidate batch |B| = "
              f"{tc['candidate_batch_size']}, K = {k_prompts}, G = {tc['group_size']} ({k_prompts * tc['group_size']} "
              f"rollouts/step except dapo_dynamic, which counts every generated rollout), lr {tc['lr']}, eval every "
              f"{tc['eval_every']} steps. Accuracy = `{bench.metric}` on the held-out split "
              + ("(mean accuracy over sampled completions per problem, the paper's avg@k)." if "avg@" in bench.metric
                 else "(greedy pass@1)."), ""]
    return lines


def render_markdown(agg: Aggregate, bench: BenchConfig, command: str, info: dict, timing: dict,
                    images: Sequence[Path], config_path: str, base_report: Optional[Path] = None,
                    st: Optional[Status] = None, runs: Optional[dict] = None) -> str:
    """The whole report (``st``: a sequential study's status; ``runs``: the runs behind ``agg``,
    for the time per run)."""
    tc = report_config(bench)
    resolved = {k: v for k, v in tc.items() if k not in ("strategy", "seed", "output_dir", "resume", "progress",
                                                          "tensorboard", "cache_dir")}
    lines = header(bench, command, config_path, info, timing, st and st.needed) + missing_section(agg.missing)
    lines += status_section(bench, st, agg) if st is not None else []
    lines += [primary_table(agg, bench.metric), "", protocol_note(agg), "",
              "## Diagnostics (means over seeds)", "", diagnostics_table(agg), "", DIAGNOSTICS_NOTE, "",
              "## Prompt perplexity vs pass rate (initial policy)", "", *spearman_section(agg, base_report), "",
              *selection_table(agg), *premise_table(agg), "## Plots", "", *[f"![{p.stem}]({p.name})" for p in images], ""]
    lines += levels_table(agg) + per_seed_table(agg, bench.metric)
    lines += time_section(bench, runs) if st is not None and runs else []
    lines += ["<details><summary>Resolved trainer config (all strategies and seeds; strategy and seed vary)</summary>",
              "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", ""]
    if bench.strategy_train:
        lines += ["Per-strategy settings, on top of the above:", "", "```yaml",
                  yaml.safe_dump(bench.strategy_train, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines + ["</details>", ""])


# ---------------------------------------------------------------- plots
def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(runs: dict, agg: Aggregate, metric: str, path: Path) -> None:
    """Left: accuracy vs cumulative rollouts per strategy, the mean over seeds and its 95% bootstrap
    band. Right: each strategy minus the baseline, paired by seed (the comparison the statistics
    make; the seeds' held-out sets differ, so the left bands also hold between-seed spread)."""
    plt = _pyplot()
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 4.8))
    base = runs[agg.baseline]
    for i, (strategy, rs) in enumerate(runs.items()):
        curves = [rs[s].curve for s in sorted(rs)]
        paired = [base[s].curve for s in sorted(rs)]
        for axis, band in ((ax, curve_band(curves)), (dx, curve_band(curves, minus=paired))):
            x, mean, lo, hi = band
            axis.plot(x, 100 * mean, color=f"C{i}", label=f"{strategy} (n={len(rs)})")
            axis.fill_between(x, 100 * lo, 100 * hi, color=f"C{i}", alpha=0.12, lw=0)
    ax.axhline(100 * float(np.mean(list(agg.thresholds.values()))), color="k", ls="--", lw=0.8,
               label=f"the target: {_target(agg)} (mean over seeds)")
    dx.axhline(0.0, color="k", lw=0.8)
    ax.set_ylabel(f"held-out {metric} (%)")
    dx.set_ylabel(f"{metric} minus {agg.baseline}, same seed (points)")
    ax.set_title(f"accuracy vs rollouts (mean over seeds, band = {int(100 * LEVEL)}% bootstrap CI)", fontsize=10)
    dx.set_title(f"paired difference to {agg.baseline} (band = {int(100 * LEVEL)}% paired bootstrap CI)", fontsize=10)
    for axis in (ax, dx):
        axis.set_xlabel("cumulative training rollouts")
        axis.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_diagnostics(runs: dict, path: Path) -> None:
    """Zero-advantage fraction, entropy, selected difficulty and reward per step (mean over seeds,
    moving average over 5% of the run)."""
    plt = _pyplot()
    panels = [(lambda m: m.batch.zero_adv_frac, "zero-advantage group fraction (trained)"),
              (lambda m: m.batch.entropy_mean, "mean token entropy"),
              (lambda m: m.selected_difficulty, "selected prompt difficulty (level)"),
              (lambda m: m.batch.reward_mean, "mean reward")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (get, title) in zip(axes.ravel(), panels):
        for i, (strategy, rs) in enumerate(runs.items()):
            n = min(len(r.metrics) for r in rs.values())
            arr = np.array([[np.nan if get(m) is None else get(m) for m in r.metrics[:n]] for r in rs.values()],
                           dtype=float)
            if np.all(np.isnan(arr)):
                continue
            w = max(1, n // 20)
            smooth = np.convolve(np.nanmean(arr, axis=0), np.ones(w) / w, mode="valid")
            ax.plot(np.arange(len(smooth)) + w, smooth, color=f"C{i}", label=strategy, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- files
def _estimate_cols(name: str, e: Optional[PairedEstimate]) -> dict:
    """CSV columns <name>, <name>_lo, <name>_hi (None without an estimate)."""
    return {name: e and e.estimate, f"{name}_lo": e and e.lo, f"{name}_hi": e and e.hi}


def csv_rows(agg: Aggregate) -> list[dict]:
    """A flat dict per strategy: the primary and secondary statistics, then the diagnostics."""
    rows = []
    for r in agg.rows:
        c = r.comparison
        row = {"strategy": r.strategy, "seeds": r.seeds, "final_mean": r.final_mean, "final_std": r.final_std,
               "finals": r.finals, "budgets": r.budgets, "reach": r.reach, "censored": r.censored,
               **_estimate_cols("ratio", c and c.ratio), "ratio_lower_bound": c and c.lower_bound,
               "decision": "reference" if c is None else c.decision,
               **_estimate_cols("final_diff", c and c.final_diff), **_estimate_cols("auc_diff", c and c.auc_diff)}
        row.update({k: v for k, v in dataclasses.asdict(r.diagnostics).items() if not isinstance(v, dict)})
        rows.append(row)
    return rows


def write_csv(agg: Aggregate, path: Path) -> None:
    """``csv_rows`` with lists space-separated and None as an empty cell."""
    rows = csv_rows(agg)
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})


def readme_markers(stem: str) -> tuple[str, str]:
    """The README comments around one benchmark's block."""
    return f"<!-- {stem}:begin -->", f"<!-- {stem}:end -->"


def update_readme(readme: Path, stem: str, content: str, heading: str) -> None:
    """Put ``content`` between the benchmark's markers in ``readme``, or append it under
    ``## heading`` when they are not there yet."""
    begin, end = readme_markers(stem)
    text = readme.read_text() if readme.exists() else ""
    block = f"{begin}\n{content}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{block}\n"
    readme.write_text(text)


def write_report(bench: BenchConfig, runs_dir: Path, results_dir: Path, command: str, config_path: str,
                 timing: Optional[dict] = None, readme: Optional[Path] = None,
                 archive: Optional[Path] = None) -> dict:
    """Aggregate the finished runs under ``runs_dir`` (or, for those not there, their copy in the
    runs ``archive``) and write ``results_dir/<stem>.{md,csv,json,png}`` and ``<stem>_diagnostics.png``
    (and the README block); a sequential study's report covers the seeds its rule needs now. Without
    a finished baseline run only ``<stem>.md`` is written, saying what is missing. Returns
    {aggregate (None without runs), markdown, files, status (a sequential study's, else None)}."""
    places = [runs_dir] + ([archive] if archive else [])
    runs, missing = load_finished(bench, places)
    st = status(bench, runs) if bench.sequential is not None else None
    if st is not None:   # the rule's seeds only: later seeds are not due (or ran past its stop)
        runs, missing = load_finished(dataclasses.replace(bench, seeds=bench.seeds[:st.needed]), places)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = {ext: results_dir / f"{bench.stem}.{ext}" for ext in ("md", "csv", "json", "png")}
    info, timing = machine_info(), timing or {}
    if not runs:
        md = "\n".join(header(bench, command, config_path, info, timing, st and st.needed)
                       + (status_section(bench, st, None) if st is not None else [])
                       + ["No finished run of the baseline yet: nothing to aggregate.", ""] + missing_section(missing))
        out["md"].write_text(md)
        return {"aggregate": None, "markdown": md, "files": [str(out["md"])], "status": st}
    agg = aggregate(runs, bench.baseline, bench.final_evals, bench.primary, missing, bench.interval)
    agg.interim = st is not None and not st.complete
    images = [out["png"], results_dir / f"{bench.stem}_diagnostics.png"]
    plot_accuracy(runs, agg, bench.metric, images[0])
    plot_diagnostics(runs, images[1])
    write_csv(agg, out["csv"])
    md = render_markdown(agg, bench, command, info, timing, images, config_path,
                         base_report=results_dir / f"{bench.stem}_base.md", st=st, runs=runs)
    out["md"].write_text(md)
    out["json"].write_text(json.dumps({"aggregate": dataclasses.asdict(agg), "machine": info, "command": command,
                                       "timing": timing, "bench": dataclasses.asdict(bench),
                                       "sequential": st and {**dataclasses.asdict(st), "complete": st.complete}}, indent=1, default=str))
    if readme is not None:
        update_readme(readme, bench.stem, f"Command: `{command}` on {info['cpu']} ({info['cores']} cores). Full report: "
                      f"`{_rel(out['md'])}`.\n\n" + primary_table(agg, bench.metric), bench.title)
    return {"aggregate": agg, "markdown": md, "files": [str(p) for p in [*images, out["csv"], out["md"], out["json"]]],
            "status": st}
