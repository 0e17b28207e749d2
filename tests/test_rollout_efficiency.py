"""The rollout-efficiency benchmark (benchmarks/rollout_efficiency.py, benchmarks/efficiency/) on
synthetic curves and synthetic run directories in the trainer's format (no training)."""
from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from prepo.metrics import BatchStats, StepMetrics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import rollout_efficiency  # noqa: E402
from efficiency import config, diagnostics, report, runner, runs, stats  # noqa: E402
from efficiency.runs import RunData  # noqa: E402

METRIC = "eval_accuracy"


def write_run(runs_dir: Path, strategy: str, seed: int, curve, *, per_step: int = 10, eval_every: int = 2,
              initial=None, spearman=None, dynamic=False, zero_adv=0.25, weights=(0.8, 1.3), edit=None, picked=None):
    """A run dir as the trainer writes it: metrics.jsonl (a StepMetrics record a step, eval_accuracy
    every ``eval_every`` steps), eval.jsonl (step 0 + evals), initial.json, summary.json, and with
    ``picked(step)`` (a selection row) selection.jsonl. ``curve`` lists the accuracies at the
    evaluations after step 0; ``edit(i, record)`` changes step i's record."""
    d = config.run_dir_of(runs_dir, strategy, seed)
    d.mkdir(parents=True)
    steps = eval_every * len(curve)
    records, evals = [], [{"step": 0, "rollouts": 0, "accuracy": initial}] if initial is not None else []
    rollouts = 0
    for s in range(1, steps + 1):
        step_r = per_step * (2 if dynamic and s % 2 else 1)
        rollouts += step_r
        m = StepMetrics(step=s, rollouts=rollouts, step_rollouts=step_r, rho=s / steps,
                        weight_applied=strategy == "prepo", reward_failures=0, selected_difficulty=2.0,
                        batch=BatchStats(reward_mean=0.5, zero_adv_frac=0.0 if dynamic else zero_adv,
                                         entropy_mean=1.0 - s / (10 * steps), weight_min=weights[0], weight_max=weights[1]),
                        dynamic={"dynamic_groups_generated": 4 if s % 2 else 2, "dynamic_groups_kept": 2} if dynamic else None)
        if s % eval_every == 0:
            m.eval = {"eval_accuracy": curve[s // eval_every - 1], "time_eval": 0.1}
            evals.append({"step": s, "rollouts": rollouts, "accuracy": m.eval["eval_accuracy"]})
        if edit is not None:
            edit(s - 1, m)
        m.picked = picked(s) if picked is not None else None
        records.append(m)
    (d / "metrics.jsonl").write_text("".join(json.dumps(m.to_dict()) + "\n" for m in records))
    if picked is not None:
        (d / "selection.jsonl").write_text("".join(json.dumps({"step": m.step, **m.picked}) + "\n" for m in records))
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    init = {"eval": {"accuracy": initial}} if initial is not None else {}
    if spearman is not None:
        init.update({"spearman_ppl_passrate": spearman, "spearman_pvalue": 0.01, "n_prompts": 50, "samples": 8,
                     "pass_rate_mean": 0.4, "pass_rate_hist": [1, 2, 3, 4, 5]})
    (d / "initial.json").write_text(json.dumps(init))
    (d / "summary.json").write_text(json.dumps({"steps": steps, "rollouts": rollouts, "train_seconds_this_process": 1.0}))
    return d


def bench_file(tmp_path: Path, name: str = "testbed_demo", **keys) -> config.BenchConfig:
    """A benchmark config file ``<name>.yaml`` in tmp_path, loaded."""
    data = {"strategies": ["random", "prepo"], "seeds": [1, 2, 3], "baseline": "random", "metric": METRIC,
            "train": {"total_steps": 6}, **keys}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load_bench_config(path)


def run_data(seed: int, curve, strategy: str = "x") -> RunData:
    """A run without step records: its budget is its curve's last rollout count."""
    return RunData(strategy, seed, list(curve))


# ---------------------------------------------------------------- one curve
def test_smooth_curve_and_final_accuracy():
    curve = [(0, 0.0), (10, 0.3), (20, 0.6), (30, 0.3)]
    sm = stats.smooth_curve(curve, 3)
    assert [x for x, _ in sm] == [0, 10, 20, 30]
    assert [a for _, a in sm] == pytest.approx([0.0, 0.15, 0.3, 0.4])
    assert stats.smooth_curve(curve, 1) == curve
    assert stats.final_accuracy(curve, 1) == 0.3
    assert stats.final_accuracy(curve, 3) == pytest.approx(0.4)       # mean of the last 3
    assert stats.final_accuracy(curve, 10) == pytest.approx(0.3)      # fewer points: all of them


def test_rollouts_to_threshold_first_crossing():
    curve = [(0, 0.1), (100, 0.3), (200, 0.5), (300, 0.4), (400, 0.6)]
    assert stats.rollouts_to_threshold(curve, 0.5) == 200  # first reach, not the last
    assert stats.rollouts_to_threshold(curve, 0.45) == 200
    assert stats.rollouts_to_threshold(curve, 0.6) == 400
    assert stats.rollouts_to_threshold(curve, 0.1) == 0    # reached before training
    assert stats.rollouts_to_threshold(curve, 0.61) is None
    # a mean that equals a point only up to rounding counts as reached
    assert stats.rollouts_to_threshold([(0, 0.0), (50, 1 / 3)], (0.1 + 0.2 + 0.7) / 3) == 50


def test_rollouts_to_reach_uses_the_smoothed_curve_and_censors():
    curve = [(0, 0.1), (100, 0.5), (200, 0.3), (300, 0.6)]
    assert stats.rollouts_to_reach(curve, 0.5, 1, 350) == (100, False)
    # trailing mean over 2: 0.1, 0.3, 0.4, 0.45 -> 0.5 never reached: the budget, censored
    assert stats.rollouts_to_reach(curve, 0.5, 2, 350) == (350, True)
    assert stats.rollouts_to_reach(curve, 0.4, 2, 350) == (200, False)


def test_normalized_auc_hand_numbers():
    # (0.2 + 0.4) / 2 * 100 + (0.4 + 0.5) / 2 * 100 = 75, over 200 rollouts
    assert stats.normalized_auc([(0, 0.2), (100, 0.4), (200, 0.5)], 200) == pytest.approx(0.375)
    # longer than the budget: cut at 200 where it is 0.5 + 50 / 150 * 0.4
    at200 = 0.5 + 0.4 / 3
    assert stats.normalized_auc([(0, 0.2), (150, 0.5), (300, 0.9)], 200) == pytest.approx(
        ((0.2 + 0.5) / 2 * 150 + (0.5 + at200) / 2 * 50) / 200)
    # shorter than the budget: held at its last value, 40 + 60 over 200
    assert stats.normalized_auc([(0, 0.2), (100, 0.6)], 200) == pytest.approx(0.5)
    # no step-0 point: held at its first value before it
    assert stats.normalized_auc([(100, 0.4), (200, 0.4)], 200) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="budget"):
        stats.normalized_auc([(0, 0.2)], 0)


# ---------------------------------------------------------------- over seeds
def test_bootstrap_ci_hand_checkable():
    assert stats.bootstrap_ci([0.7]) == (pytest.approx(0.7), pytest.approx(0.7))   # one seed: no spread
    # two seeds: the resampled mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4): 2.5% / 97.5% = 0 / 1
    lo, hi = stats.bootstrap_ci([0.0, 1.0])
    assert (lo, hi) == (0.0, 1.0)
    # a narrower level cuts off the extremes
    assert stats.bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)
    # seeds on axis 0, trailing dims kept (a curve per seed)
    lo, hi = stats.bootstrap_ci([[0.0, 2.0], [1.0, 2.0]])
    assert lo.tolist() == [0.0, 2.0] and hi.tolist() == [1.0, 2.0]
    rng = np.random.default_rng(5)
    x = rng.normal(size=12)
    a, b = stats.bootstrap_ci(x), stats.bootstrap_ci(x)
    assert a == b and a[0] < x.mean() < a[1]   # reproducible (fixed RNG seed), around the mean
    assert stats.bootstrap_ci(x, seed=1) != a
    with pytest.raises(ValueError, match="one value per seed"):
        stats.bootstrap_ci([])


def test_geometric_mean_and_decision_rule():
    assert stats.geometric_mean(np.array([0.5, 2.0])) == pytest.approx(1.0)
    assert stats.geometric_mean(np.array([[1.0, 4.0], [1.0, 1.0]]), axis=1).tolist() == pytest.approx([2.0, 1.0])
    est = lambda lo, hi: stats.PairedEstimate([], (lo + hi) / 2, lo, hi)  # noqa: E731
    assert stats.decide(est(0.5, 0.99)) == "saves rollouts"
    assert stats.decide(est(1.01, 2.0)) == "costs rollouts"
    assert stats.decide(est(0.5, 1.0)) == "inconclusive"
    assert stats.decide(est(1.0, 1.5)) == "inconclusive"
    assert stats.decide(None) == "n/a"
    # a censored seed counts at its budget, below its true ratio: no 'saves' from such an interval
    assert stats.decide(est(0.5, 0.99), n_censored=1) == "inconclusive (censored)"
    assert stats.decide(est(1.01, 2.0), n_censored=1) == "costs rollouts"


BASE = {1: run_data(1, [(0, 0.2), (100, 0.4), (200, 0.5)], "random"),    # final 0.5, reached at 200
        2: run_data(2, [(0, 0.2), (100, 0.6), (200, 0.6)], "random")}    # final 0.6, reached at 100


def test_primary_and_secondary_hand_checked():
    strat = {1: run_data(1, [(0, 0.2), (100, 0.5), (200, 0.7)]),    # reaches 0.5 at 100
             2: run_data(2, [(0, 0.2), (100, 0.3), (200, 0.55)])}   # never 0.6: censored at its budget 200
    c = stats.compare(strat, BASE, final_evals=1)
    # ratios 100 / 200 and 200 / 100: geometric mean 1; bootstrap over 2 seeds spans both
    assert c.ratio.per_seed == pytest.approx([0.5, 2.0])
    assert c.ratio.estimate == pytest.approx(1.0)
    assert (c.ratio.lo, c.ratio.hi) == (pytest.approx(0.5), pytest.approx(2.0))
    assert c.n_censored == 1 and c.lower_bound and c.decision == "inconclusive"
    # final: 0.7 - 0.5, 0.55 - 0.6
    assert c.final_diff.per_seed == pytest.approx([0.2, -0.05])
    assert c.final_diff.estimate == pytest.approx(0.075)
    assert (c.final_diff.lo, c.final_diff.hi) == (pytest.approx(-0.05), pytest.approx(0.2))
    # AUC over 200 rollouts: strategy (35 + 60) / 200 vs 75 / 200; (25 + 42.5) / 200 vs (40 + 60) / 200
    assert c.auc_diff.per_seed == pytest.approx([0.475 - 0.375, 0.3375 - 0.5])
    assert c.auc_diff.estimate == pytest.approx((0.1 - 0.1625) / 2)


def test_final_evals_sets_final_and_reach():
    strat = {1: run_data(1, [(0, 0.2), (100, 0.5), (200, 0.4)]),
             2: run_data(2, [(0, 0.2), (100, 0.7), (200, 0.7)])}
    # last-2 means: baseline 0.45 / 0.6; strategy 0.45 / 0.7
    assert stats.baseline_thresholds(BASE, 2) == {1: pytest.approx(0.45), 2: pytest.approx(0.6)}
    c = stats.compare(strat, BASE, final_evals=2)
    assert c.final_diff.per_seed == pytest.approx([0.0, 0.1])
    # smoothed: strategy 0.2, 0.35, 0.45 / 0.2, 0.45, 0.7 -> 200, 200; baseline 0.2, 0.3, 0.45 / 0.2, 0.4, 0.6 -> 200, 200
    assert stats.reach_per_seed(strat, {1: 0.45, 2: 0.6}, 2) == ([200, 200], [False, False])
    assert c.ratio.per_seed == pytest.approx([1.0, 1.0]) and c.n_censored == 0
    # with final_evals = 1 the same strategy reaches 0.5 / 0.6 at 100 / 100
    assert stats.compare(strat, BASE, final_evals=1).ratio.per_seed == pytest.approx([0.5, 1.0])


def test_decisions_on_clear_cases():
    base = {s: run_data(s, [(0, 0.2), (100, 0.3), (200, 0.4), (400, 0.6)]) for s in (1, 2, 3)}
    fast = {s: run_data(s, [(0, 0.2), (100, 0.4), (200, 0.6), (400, 0.7)]) for s in (1, 2, 3)}
    slow = {s: run_data(s, [(0, 0.2), (400, 0.4), (800, 0.6)]) for s in (1, 2, 3)}
    c = stats.compare(fast, base, 1)
    assert c.ratio.estimate == pytest.approx(0.5) and c.ratio.hi == pytest.approx(0.5) and c.decision == "saves rollouts"
    c = stats.compare(slow, base, 1)
    assert c.ratio.estimate == pytest.approx(2.0) and c.decision == "costs rollouts" and not c.lower_bound


def test_degenerate_seed_has_no_ratio(tmp_path):
    rd = tmp_path / "runs"
    for k in (1, 2):
        write_run(rd, "random", k, [0.2, 0.25], initial=0.3)  # training made it worse
        write_run(rd, "prepo", k, [0.1, 0.2], initial=0.3)
    agg = stats.aggregate(runs.load_runs([rd], ["random", "prepo"], [1, 2], METRIC)[0], "random")
    assert agg.degenerate_seeds == [1, 2]
    pp = agg.rows[1]
    assert pp.reach == [0, 0] and pp.comparison.ratio is None and pp.comparison.decision == "n/a"
    assert "Degenerate on seed(s) [1, 2]" in report.protocol_note(agg)
    assert "random's final accuracy does not exceed" in report.protocol_note(agg)
    assert "Final diff: final accuracy, strategy - random, per seed" in report.protocol_note(agg)
    half = stats.aggregate(runs.load_runs([rd], ["random", "prepo"], [1, 2], METRIC)[0], "random",
                           primary="half_budget_threshold")
    assert half.degenerate_seeds == [1, 2] and "random's accuracy at half its budget does not exceed" in report.protocol_note(half)
    assert "| prepo | n/a |" in report.primary_table(agg, METRIC)


def test_seeds_must_pair():
    with pytest.raises(ValueError, match="paired"):
        stats.compare({1: BASE[1]}, BASE, 1)


def test_curve_band():
    curves = [[(0, 0.2), (100, 0.4)], [(0, 0.4), (50, 0.4), (120, 0.8)]]
    x, mean, lo, hi = stats.curve_band(curves, n_points=3)
    assert x.tolist() == [0, 50, 100]   # the range both curves cover
    assert mean.tolist() == pytest.approx([0.3, 0.35, (0.4 + 0.4 + 0.4 * 50 / 70) / 2])
    assert lo.tolist() == pytest.approx([0.2, 0.3, 0.4]) and hi[0] == pytest.approx(0.4)
    x, mean, lo, hi = stats.curve_band([curves[0]] * 3, n_points=2)
    assert lo.tolist() == mean.tolist() == hi.tolist() == pytest.approx([0.2, 0.4])
    # paired: seed i minus baseline seed i, on the range all of them cover
    x, mean, lo, hi = stats.curve_band(curves, n_points=3, minus=[[(0, 0.1), (100, 0.1)], [(0, 0.4), (100, 0.6)]])
    assert x.tolist() == [0, 50, 100]
    assert mean.tolist() == pytest.approx([(0.1 + 0.0) / 2, (0.2 + (0.4 - 0.5)) / 2, (0.3 + (0.4 + 0.4 * 50 / 70 - 0.6)) / 2])


# ---------------------------------------------------------------- whole aggregation from files
@pytest.fixture
def runs_dir(tmp_path):
    rd = tmp_path / "runs"
    # random: finals 0.5, 0.6, 0.7 = the thresholds of seeds 1, 2, 3
    write_run(rd, "random", 1, [0.3, 0.4, 0.5], initial=0.2, spearman=-0.2)
    write_run(rd, "random", 2, [0.3, 0.6, 0.6], initial=0.2, spearman=-0.3)
    write_run(rd, "random", 3, [0.4, 0.5, 0.7], initial=0.2, spearman=-0.1)
    # prepo reaches its seed's threshold at the first eval on seeds 1, 2; never on seed 3
    write_run(rd, "prepo", 1, [0.6, 0.7, 0.7], initial=0.2, spearman=-0.2, weights=(0.5, 2.0))
    write_run(rd, "prepo", 2, [0.65, 0.7, 0.8], initial=0.2, spearman=-0.3)
    write_run(rd, "prepo", 3, [0.4, 0.5, 0.55], initial=0.2, spearman=-0.1)
    # dapo: more rollouts per step
    for k in (1, 2, 3):
        write_run(rd, "dapo_dynamic", k, [0.5, 0.6, 0.6], initial=0.2, spearman=-0.2, dynamic=True)
    return rd


def test_aggregate_from_files(runs_dir):
    loaded, missing = runs.load_runs([runs_dir], ["random", "prepo", "dapo_dynamic"], [1, 2, 3], METRIC)
    assert not missing
    assert loaded["random"][1].curve == [(0, 0.2), (20, 0.3), (40, 0.4), (60, 0.5)]
    agg = stats.aggregate(loaded, "random")
    assert agg.thresholds == {1: 0.5, 2: 0.6, 3: 0.7} and not agg.degenerate_seeds
    rows = {r.strategy: r for r in agg.rows}
    assert agg.rows[0].strategy == "random" and rows["random"].comparison is None

    rnd = rows["random"]
    assert rnd.final_mean == pytest.approx(0.6) and rnd.final_std == pytest.approx(0.1)
    assert rnd.reach == [60, 40, 60] and not any(rnd.censored)   # the baseline reaches its own final

    pp = rows["prepo"]
    assert pp.reach == [20, 20, 60] and pp.censored == [False, False, True]
    assert pp.comparison.ratio.per_seed == pytest.approx([1 / 3, 0.5, 1.0])
    assert pp.comparison.ratio.estimate == pytest.approx((1 / 6) ** (1 / 3))
    assert pp.comparison.n_censored == 1
    assert pp.comparison.final_diff.per_seed == pytest.approx([0.2, 0.2, -0.15])
    assert pp.diagnostics.weight_min == 0.5 and pp.diagnostics.weight_max == 2.0 and pp.diagnostics.weight_applied
    assert pp.diagnostics.zero_adv_frac == pytest.approx(0.25)

    dd = rows["dapo_dynamic"]
    # 6 steps: odd steps 20 rollouts, even 10 -> evals at 30, 60, 90
    assert dd.reach == [30, 60, 90] and dd.censored == [False, False, True] and dd.budgets == [90, 90, 90]
    assert dd.comparison.ratio.estimate == pytest.approx((0.5 * 1.5 * 1.5) ** (1 / 3))
    # AUC on random's 60 rollouts: (0.2+0.5)/2*30 + (0.5+0.6)/2*30 = 27 vs (0.25+0.35+0.45)*20 = 21
    assert dd.comparison.auc_diff.per_seed[0] == pytest.approx(27 / 60 - 21 / 60)
    assert dd.diagnostics.zero_adv_frac == 0.0
    # 3 odd steps generate 4 keep 2, 3 even generate 2 keep 2 -> 6 dropped of 18
    assert dd.diagnostics.generated_zero_adv_frac == pytest.approx(6 / 18)

    assert agg.spearman["mean"] == pytest.approx(-0.2) and sorted(agg.spearman["per_seed"]) == [1, 2, 3]


def test_curve_without_step0_and_avg_metric(tmp_path):
    def add_avg(i, m):
        if m.eval:
            m.eval["eval_avg@8"] = m.eval["eval_accuracy"] / 2

    d = write_run(tmp_path / "runs", "random", 1, [0.3, 0.4], edit=add_avg)
    r = runs.load_run(d, "random", 1, "eval_avg@8")
    assert r.curve == [(20, 0.15), (40, 0.2)] and r.initial_acc is None and r.greedy_final == 0.4
    with pytest.raises(ValueError, match="eval_avg@16"):
        runs.load_run(d, "random", 1, "eval_avg@16")


def test_wall_time_says_which_runs_it_covers(tmp_path):
    """A study run over several sessions: the invocation that finished timed only its own runs."""
    b, info = bench_file(tmp_path), {"cpu": "AMD EPYC", "cores": 2, "python": "3.11"}
    part = "\n".join(report.header(b, "cmd", "cfg.yaml", info, {"wall_seconds": 120.0, "run_seconds": {"prepo/seed3": 60.0}}))
    assert "Wall time of the runs: 2.0 min, covering 1 of the 6 runs (the others ran in invocations" in part
    every = {f"{s}/seed{k}": 20.0 for s in b.strategies for k in b.seeds}
    whole = "\n".join(report.header(b, "cmd", "cfg.yaml", info, {"wall_seconds": 120.0, "run_seconds": every}))
    assert "Wall time of the runs: 2.0 min.  " in whole


def test_a_run_with_a_step_written_twice_is_refused(tmp_path):
    d = write_run(tmp_path / "runs", "random", 1, [0.3, 0.4])
    lines = (d / "metrics.jsonl").read_text().splitlines(keepends=True)
    (d / "metrics.jsonl").write_text("".join(lines[:2] + lines[1:]))
    with pytest.raises(ValueError, match=r"steps \[2\] appear more than once"):
        runs.load_run(d, "random", 1, METRIC)


def test_missing_run_is_reported(tmp_path):
    write_run(tmp_path, "random", 2, [0.3, 0.4])
    write_run(tmp_path, "prepo", 1, [0.3, 0.4])
    (config.run_dir_of(tmp_path, "prepo", 1) / "summary.json").unlink()   # interrupted: not finished
    loaded, missing = runs.load_runs([tmp_path], ["random", "prepo"], [1, 2], METRIC)
    assert list(loaded) == ["random"] and list(loaded["random"]) == [2]
    assert [m.split(":")[0] for m in missing] == ["random/seed1", "prepo/seed1", "prepo/seed2"]
    assert "not finished" in missing[0]
    # a summary of fewer steps than the config's is an older or shorter run: not finished either
    assert list(runs.load_runs([tmp_path], ["random"], [2], METRIC, total_steps=4)[0]["random"]) == [2]
    assert runs.load_runs([tmp_path], ["random"], [2], METRIC, total_steps=5)[0] == {}


def test_step_records_diagnostics(tmp_path):
    rd = tmp_path / "runs"
    write_run(rd, "random", 1, [0.3, 0.4], initial=0.2)

    def spread_and_skips(i, m):
        m.batch.weight_p10, m.batch.weight_p90 = 0.8, 1.2
        m.selection = {"greso_skipped": i % 2 * 3, "greso_backfilled": 0}

    write_run(rd, "greso", 1, [0.3, 0.5], initial=0.2, edit=spread_and_skips)
    loaded = runs.load_runs([rd], ["random", "greso"], [1], METRIC)[0]
    r = loaded["greso"][1]
    assert isinstance(r.metrics[0], StepMetrics) and r.metrics[1].selection["greso_skipped"] == 3
    assert r.total_rollouts == r.metrics[-1].rollouts == 40
    d = diagnostics.diagnose(loaded["greso"])
    assert d.weight_p10_mean == pytest.approx(0.8) and d.weight_p90_mean == pytest.approx(1.2)
    assert d.greso_skipped_mean == pytest.approx(1.5)
    assert diagnostics.diagnose(loaded["random"]).greso_skipped_mean is None
    table = report.diagnostics_table(stats.aggregate(loaded, "random"))
    assert "| 0.80 / 1.20 |" in table and "| 1.50 |" in table
    # entropy over the first / last 10% of the 4 steps: step 1 and step 4
    assert d.entropy_first10 == pytest.approx(1 - 1 / 40) and d.entropy_last10 == pytest.approx(1 - 4 / 40)


# ---------------------------------------------------------------- the report
def test_report_files_named_by_config_and_primary_table_first(runs_dir, tmp_path):
    pytest.importorskip("matplotlib")
    bench = bench_file(tmp_path, strategies=["random", "prepo", "dapo_dynamic"], title="Testbed 9: demo",
                       description="Why this testbed.", final_evals=2)
    res = tmp_path / "results"
    out = report.write_report(bench, runs_dir, res, "python benchmarks/rollout_efficiency.py", "cfg.yaml")
    for name in ("testbed_demo.md", "testbed_demo.csv", "testbed_demo.png", "testbed_demo.json",
                 "testbed_demo_diagnostics.png"):
        assert (res / name).exists(), name
    md = (res / "testbed_demo.md").read_text()
    assert md.startswith("# Testbed 9: demo\n\nWhy this testbed.\n")
    assert "Setup: task `arithmetic`" in md and "mean of its last 2 evaluations" in md
    first_table = md.index("| strategy | rollouts to reach random's final")
    assert first_table < md.index("## Diagnostics") < md.index("## Prompt perplexity") < md.index("## Plots")
    assert "| random | 1 (reference) | 0/3 | reference |" in md and "≥" in md
    assert out["aggregate"].final_evals == 2
    with (res / "testbed_demo.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["random", "prepo", "dapo_dynamic"]
    assert rows[0]["decision"] == "reference" and rows[1]["decision"] in ("inconclusive", "saves rollouts", "costs rollouts")
    data = json.loads((res / "testbed_demo.json").read_text())
    assert data["bench"]["stem"] == "testbed_demo" and len(data["aggregate"]["rows"]) == 3


def test_spearman_section_points_to_the_base_policy_measurement(tmp_path):
    agg = type("Agg", (), {"spearman": {}})()    # runs made with spearman_prompts = 0
    base = tmp_path / "testbed_demo_base.md"
    assert report.spearman_section(agg, base) == ["Not measured (spearman_prompts = 0 in the config)."]
    base.write_text("# base\n")                 # benchmarks/testbed_properties.py's measurement
    assert "[testbed_demo_base.md](testbed_demo_base.md)" in report.spearman_section(agg, base)[0]


def test_setup_line_names_the_task(runs_dir, tmp_path):
    bench = bench_file(tmp_path, train={"total_steps": 6, "task": "countdown"})
    lines = report.header(bench, "cmd", "cfg.yaml", runner.machine_info(), {})
    assert any(line.startswith("Setup: task `countdown`, 6 steps") for line in lines)


def test_readme_blocks_per_stem(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    report.update_readme(readme, "rollout_efficiency", "table A", "Rollout efficiency")
    report.update_readme(readme, "testbed_countdown", "table B", "Testbed 1: countdown")
    report.update_readme(readme, "rollout_efficiency", "table A2", "Rollout efficiency")   # in place
    text = readme.read_text()
    assert text.startswith("# project")
    for stem in ("rollout_efficiency", "testbed_countdown"):
        begin, end = report.readme_markers(stem)
        assert text.count(begin) == 1 and text.count(end) == 1
    assert "table A2" in text and "table A\n" not in text and "table B" in text
    assert text.count("## Testbed 1: countdown") == 1
    assert text.index("table A2") < text.index("table B")


def test_levels_and_per_seed_tables(tmp_path):
    pytest.importorskip("matplotlib")
    rd = tmp_path / "runs"
    for s in ("random", "prepo"):
        d = write_run(rd, s, 1, [0.3, 0.4 if s == "random" else 0.35], initial=0.2)
        evals = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
        for e in evals:
            e.update({"accuracy_level0": 1.0, "accuracy_level1": e["accuracy"] / 2})
        (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    bench = bench_file(tmp_path, seeds=[1], train={"total_steps": 4})
    out = report.write_report(bench, rd, tmp_path / "res", "cmd", "cfg.yaml")
    d = out["aggregate"].rows[0].diagnostics
    assert d.levels_initial == {0: 1.0, 1: 0.1} and d.levels_final == {0: 1.0, 1: 0.2}
    assert "| (initial policy) | 100.0 | 10.0 |" in out["markdown"]
    assert "| random | 20.0 | 40.0 / 40 |" in out["markdown"]
    assert "| prepo | 20.0 | 35.0 / not reached (≥40) |" in out["markdown"]


def test_cli_aggregate_only(runs_dir, tmp_path):
    pytest.importorskip("matplotlib")
    cfg = tmp_path / "testbed_cli.yaml"
    cfg.write_text(yaml.safe_dump({"strategies": ["random", "prepo"], "seeds": [1, 2, 3], "metric": METRIC,
                                   "title": "Testbed 0: cli", "train": {"total_steps": 6}}))
    readme = tmp_path / "README.md"
    res = tmp_path / "results"
    assert rollout_efficiency.main(["--config", str(cfg), "--aggregate-only", "--runs-dir", str(runs_dir),
                                    "--results-dir", str(res), "--update-readme", str(readme)]) == 0
    assert (res / "testbed_cli.md").read_text().startswith("# Testbed 0: cli")
    text = readme.read_text()
    assert "<!-- testbed_cli:begin -->" in text and "## Testbed 0: cli" in text and "| prepo | ≥" in text


# ---------------------------------------------------------------- the config
def test_bench_config_committed_is_valid():
    bench = config.load_bench_config(config.DEFAULT_CONFIG)
    assert bench.stem == "rollout_efficiency" and bench.baseline == "random"
    assert bench.runs_dir == "runs/rollout_efficiency" and bench.final_evals == 1
    assert {"random", "prepo", "ppl_only", "entropy_only", "static_low_ppl", "dapo_dynamic"} <= set(bench.strategies)
    assert len(bench.seeds) >= 3
    assert all(s >= 100 or s == 0 for s in bench.tuning_seeds)  # 0: the trainer's development seed
    assert not set(bench.seeds) & set(bench.tuning_seeds)
    for quick in (False, True):
        b = config.load_bench_config(config.DEFAULT_CONFIG, quick=quick)
        config.full_config(config.run_config(b, b.baseline, b.seeds[0], Path("/tmp/x")))  # the trainer accepts it
    q = config.load_bench_config(config.DEFAULT_CONFIG, quick=True)
    assert q.is_quick and q.train["total_steps"] < bench.train["total_steps"] and q.metric == "eval_accuracy"
    assert config.run_config(b, "prepo", 2, Path("/r"))["output_dir"] == "/r/prepo/seed2"


TOY_TESTBEDS = sorted(p for p in (ROOT / "benchmarks" / "configs").glob("testbed_*.yaml")
                     if not p.stem.startswith("testbed_smollm2"))
# the strategies every toy testbed ran (PROTOCOL.md)
TOY_STRATEGIES = {"random", "prepo", "ppl_only", "entropy_only", "static_low_ppl", "static_high_ppl", "dapo_dynamic",
                  "greso"}


@pytest.mark.parametrize("path", TOY_TESTBEDS, ids=lambda p: p.stem)
def test_testbed_configs_are_preregistered_and_valid(path):
    bench = config.load_bench_config(path)
    assert (ROOT / "benchmarks" / "preregistration" / f"{path.stem}.md").exists()
    assert set(bench.strategies) == TOY_STRATEGIES and len(bench.seeds) >= 5 and bench.final_evals == 3
    assert not set(bench.seeds) & set(bench.tuning_seeds) and bench.title.startswith("Testbed")
    resolved = config.full_config(config.run_config(bench, "prepo", bench.seeds[0], Path("/tmp/x")))
    assert resolved["task"] == path.stem.removeprefix("testbed_")


def test_bench_config_optional_keys(tmp_path):
    b = bench_file(tmp_path, "testbed_phrasing", title="Testbed 2: phrasing", description="  A paragraph.\n",
                   final_evals=3, quick={"final_evals": 1, "seeds": [1], "train": {"total_steps": 2}})
    assert (b.stem, b.title, b.description, b.final_evals) == ("testbed_phrasing", "Testbed 2: phrasing", "A paragraph.", 3)
    assert b.runs_dir == "runs/testbed_phrasing"   # default: per config
    q = config.load_bench_config(tmp_path / "testbed_phrasing.yaml", quick=True)
    assert q.final_evals == 1 and q.seeds == [1] and q.train == {"total_steps": 2}
    b = bench_file(tmp_path, runs_dir="elsewhere/x")
    assert b.runs_dir == "elsewhere/x" and b.title == config.DEFAULT_TITLE and b.description == ""


@pytest.mark.parametrize("keys, message", [
    ({"seeds": [1, 2], "tuning_seeds": [2]}, "tuning"),
    ({"strategies": ["random", "gresso"]}, "unknown strategies \\['gresso'\\]"),
    ({"baseline": "ppl_only"}, "baseline 'ppl_only'"),
    ({"metric": "accuracy"}, "eval key"),
    ({"final_evals": 0}, "final_evals"),
    ({"primary": "auc_threshold"}, "primary must be one of final_threshold, half_budget_threshold"),
    ({"seeds": []}, "no seeds"),
    ({"smoothing": 3}, "unknown keys \\['smoothing'\\]"),
    ({"quick": {"baseline": "prepo"}}, "unknown keys under quick"),
])
def test_bad_bench_config_is_refused(tmp_path, keys, message):
    with pytest.raises(SystemExit, match=message):
        bench_file(tmp_path, **keys)


def test_bench_config_accepts_the_trainer_strategies(tmp_path):
    b = bench_file(tmp_path, strategies=["random", "static_high_ppl", "greso"])
    assert b.strategies == ["random", "static_high_ppl", "greso"]


def test_run_status_detects_mismatch_and_done(tmp_path):
    cfg = {"strategy": "random", "seed": 1, "total_steps": 4, "output_dir": str(tmp_path / "r")}
    d = Path(cfg["output_dir"])
    assert runner.run_status(d, cfg)[0] == "new"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(config.full_config(cfg)))
    assert runner.run_status(d, cfg)[0] == "new"
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "step2").mkdir()
    assert runner.run_status(d, cfg)[0] == "resume"
    (d / "summary.json").write_text(json.dumps({"steps": 4}))
    assert runner.run_status(d, cfg)[0] == "done"
    status, diff = runner.run_status(d, dict(cfg, lr=1e-5))
    assert status == "mismatch" and diff == ["lr"]
    # keys that cannot change the result do not count
    assert runner.run_status(d, dict(cfg, progress=False))[0] == "done"


def test_harness_meta_adds_up_invocations(tmp_path):
    t1 = {"wall_seconds": 10.0, "total_seconds_incl_setup": 12.0, "run_seconds": {"random/seed1": 10.0}}
    runner.save_harness_meta(tmp_path, "cmd", t1, 2)
    t2 = runner.save_harness_meta(tmp_path, "cmd", {"wall_seconds": 5.0, "total_seconds_incl_setup": 6.0,
                                                     "run_seconds": {"prepo/seed1": 5.0}}, 2)
    assert t2["wall_seconds"] == 15.0 and t2["invocations"] == 2 and set(t2["run_seconds"]) == {"random/seed1", "prepo/seed1"}
    timing, command = runner.load_harness_meta(tmp_path, "cmd --aggregate-only")
    assert timing == t2 and command == "cmd  (aggregated with: cmd --aggregate-only)"
    assert math.isclose(json.loads((tmp_path / "harness.json").read_text())["timing"]["total_seconds_incl_setup"], 18.0)


# ---------------------------------------------------------------- round 3: primary, export, selection
def test_half_budget_accuracy_hand_checked():
    curve = [(0, 0.1), (100, 0.2), (200, 0.4), (300, 0.5), (400, 0.6)]
    assert stats.half_budget_accuracy(curve, 1, 400) == 0.4          # the point at 200 = 400 / 2
    assert stats.half_budget_accuracy(curve, 2, 400) == pytest.approx(0.3)   # smoothed (0.2 + 0.4) / 2
    assert stats.half_budget_accuracy(curve, 1, 350) == 0.2          # last point within 175
    assert stats.half_budget_accuracy(curve[1:], 1, 100) == 0.2      # none within 50: the first point


# the baseline still rises at its end (as random did at 100 steps); the strategy gets anywhere 0.6x as fast
RISING = {s: run_data(s, [(0, 0.1), (100, 0.2), (200, 0.3), (300, 0.4), (400, 0.5), (500, 0.6)], "random")
          for s in (1, 2, 3)}
FASTER = {s: run_data(s, [(0, 0.1), (60, 0.2), (120, 0.3), (180, 0.4), (240, 0.5), (300, 0.55), (400, 0.58),
                          (500, 0.59)]) for s in (1, 2, 3)}


def test_half_budget_threshold_shows_a_saving_the_final_threshold_censors():
    # final rule: the strategy never reaches random's final 0.6 (censored at its budget): >= 1, no saving shown
    c = stats.compare(FASTER, RISING, 1)
    assert c.n_censored == 3 and c.ratio.estimate == pytest.approx(1.0) and c.decision == "inconclusive"
    # half-budget rule: random's accuracy at 250 rollouts (its point at 200) is 0.3: 120 vs 200 rollouts
    assert stats.baseline_thresholds(RISING, 1, "half_budget_threshold") == {1: 0.3, 2: 0.3, 3: 0.3}
    c = stats.compare(FASTER, RISING, 1, "half_budget_threshold")
    assert c.n_censored == 0 and c.ratio.per_seed == pytest.approx([0.6] * 3) and c.decision == "saves rollouts"
    # the secondaries do not depend on the primary: final 0.59 against random's final 0.6, not its threshold
    assert c.final_diff.per_seed == pytest.approx([-0.01] * 3)
    assert c.final_diff.per_seed == stats.compare(FASTER, RISING, 1).final_diff.per_seed
    assert c.auc_diff.per_seed == stats.compare(FASTER, RISING, 1).auc_diff.per_seed
    with pytest.raises(ValueError, match="primary"):
        stats.baseline_thresholds(RISING, 1, "auc")


def test_decision_names_an_underpowered_interval():
    est = lambda lo, hi, n=3: stats.PairedEstimate([1.0] * n, (lo + hi) / 2, lo, hi)  # noqa: E731
    w = stats.POWER_WIDTH
    assert w == pytest.approx(0.41)
    assert stats.decide(est(0.7, 1.3), power_width=w) == "inconclusive (underpowered: 3 seeds, 95% CI width 0.60)"
    assert stats.decide(est(0.9, 1.1), power_width=w) == "inconclusive"   # narrow: a real null
    assert stats.decide(est(0.3, 0.9), power_width=w) == "saves rollouts"  # wide but decided
    assert stats.decide(est(0.3, 0.9), 1, w) == "inconclusive (censored; underpowered: 3 seeds, 95% CI width 0.60)"
    assert stats.decide(est(0.7, 1.3)) == "inconclusive"   # the toy testbeds' rule has no such clause
    # wired to the primary: a wide interval over 2 seeds
    strat = {1: run_data(1, [(0, 0.1), (100, 0.3), (500, 0.6)]), 2: run_data(2, [(0, 0.1), (300, 0.3), (500, 0.6)])}
    base = {s: RISING[s] for s in (1, 2)}
    assert stats.compare(strat, base, 1, "half_budget_threshold").decision.startswith("inconclusive (underpowered: 2 seeds")
    assert stats.compare(strat, base, 1).decision == "inconclusive"


def test_report_words_follow_the_primary(runs_dir, tmp_path):
    pytest.importorskip("matplotlib")
    b = bench_file(tmp_path, primary="half_budget_threshold", strategies=["random", "prepo"])
    assert b.primary == "half_budget_threshold" and bench_file(tmp_path).primary == "final_threshold"
    out = report.write_report(b, runs_dir, tmp_path / "res", "cmd", "cfg.yaml")
    md = out["markdown"]
    assert out["aggregate"].primary == "half_budget_threshold"
    assert "rollouts to reach random's half-budget accuracy, ratio vs random" in md
    assert "within half its rollout budget" in md and "reported as underpowered" in md
    # random seed 1: 0.3, 0.4, 0.5 at 20, 40, 60 rollouts: 0.4 at 30 -> 0.3 (its point at 20)
    assert out["aggregate"].thresholds == {1: 0.3, 2: 0.3, 3: 0.4}


def test_archive_then_aggregate_from_the_archive_alone(tmp_path):
    """A fresh clone: no runs dir, only the study's runs archive; unfinished runs listed as missing."""
    pytest.importorskip("matplotlib")
    b = bench_file(tmp_path, seeds=[1, 2])
    rd, exp = tmp_path / "runs", tmp_path / "testbed_demo_runs.json.gz"
    for s, k, curve in (("random", 1, [0.3, 0.4, 0.5]), ("random", 2, [0.3, 0.5, 0.6]), ("prepo", 1, [0.5, 0.6, 0.6])):
        d = write_run(rd, s, k, curve, initial=0.2, picked=lambda step: {"rho": step / 6, "pass_rate": [0.5]})
        cfg = config.run_config(b, s, k, rd)
        (d / "config.yaml").write_text(yaml.safe_dump(config.full_config(cfg)))
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "last.pt").write_text("big")
    plan = runner.plan_runs(b, rd, False, exp)
    for item in plan:
        runner.export(item, exp)
    archived = runs.read_archive(exp)["runs"]
    assert sorted(archived["random/seed1"]) == sorted(runs.RUN_FILES)   # no checkpoint
    assert archived["random/seed1"] == runs.run_files(rd / "random" / "seed1")
    assert "prepo/seed2" not in archived   # never ran: nothing to archive
    # the archived copy makes a run done even where the runs dir lacks it
    shutil.rmtree(rd)
    plan = runner.plan_runs(b, rd, False, exp)   # seed by seed: a study cut short holds whole pairs
    assert [(p[0], p[1], p[3]) for p in plan] == [("random", 1, "done"), ("prepo", 1, "done"),
                                                   ("random", 2, "done"), ("prepo", 2, "new")]
    res = tmp_path / "results"
    assert rollout_efficiency.main(["--config", str(tmp_path / "testbed_demo.yaml"), "--aggregate-only",
                                    "--runs-dir", str(rd), "--runs-archive", str(exp), "--results-dir", str(res)]) == 0
    md = (res / "testbed_demo.md").read_text()
    assert "**Incomplete: 1 run(s) missing" in md and "- prepo/seed2: not finished" in md
    assert "| prepo | 20.0 | 60.0 / 20 | missing |" in md   # per seed: seed 2 missing


def test_archive_writes_paths_relative_to_the_repository(tmp_path):
    """The committed copy names no machine: paths under the root lose it, others are kept; the
    archive's bytes depend on its content alone, and a run archived again replaces its copy."""
    run_dir = tmp_path / "runs" / "random" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"output_dir: {run_dir}\nmodel: /elsewhere/model\n")
    (run_dir / "summary.json").write_text(json.dumps({"metrics": str(run_dir / "metrics.jsonl"), "steps": 3}))
    archive = tmp_path / "study_runs.json.gz"
    runs.archive_run(run_dir, archive, "random", 1, root=tmp_path)
    first = archive.read_bytes()
    files = runs.read_archive(archive)["runs"]["random/seed1"]
    assert yaml.safe_load(files["config.yaml"]) == {"output_dir": "runs/random/seed1", "model": "/elsewhere/model"}
    assert json.loads(files["summary.json"]) == {"metrics": "runs/random/seed1/metrics.jsonl", "steps": 3}
    assert sorted(files) == ["config.yaml", "summary.json"]
    runs.archive_run(run_dir, archive, "random", 1, root=tmp_path)
    assert archive.read_bytes() == first
    (run_dir / "summary.json").write_text(json.dumps({"steps": 4}))
    runs.archive_run(run_dir, archive, "random", 1, root=tmp_path)
    assert json.loads(runs.read_archive(archive)["runs"]["random/seed1"]["summary.json"]) == {"steps": 4}


def test_unpaired_runs_wait_for_their_baseline(tmp_path):
    pytest.importorskip("matplotlib")
    b = bench_file(tmp_path, seeds=[1, 2])
    rd = tmp_path / "runs"
    write_run(rd, "random", 1, [0.3, 0.4, 0.5])
    write_run(rd, "prepo", 1, [0.5, 0.6, 0.6])
    write_run(rd, "prepo", 2, [0.5, 0.6, 0.6])
    loaded, missing = runs.load_finished(b, [rd])
    assert sorted(loaded["prepo"]) == [1] and missing[-1] == "prepo/seed2: finished, but unpaired until random/seed2 is"
    with pytest.raises(ValueError, match="no random run of the same seed"):
        stats.aggregate({"random": {1: loaded["random"][1]}, "prepo": {2: loaded["prepo"][1]}}, "random")
    shutil.rmtree(config.run_dir_of(rd, "random", 1))
    assert runs.load_finished(b, [rd])[0] == {}   # nothing pairs without the baseline
    out = report.write_report(b, rd, tmp_path / "res", "cmd", "cfg.yaml")
    assert out["aggregate"] is None and out["files"] == [str(tmp_path / "res" / "testbed_demo.md")]
    assert "No finished run of the baseline yet" in out["markdown"] and "- random/seed1: not finished" in out["markdown"]


def test_selection_by_third_of_the_run(tmp_path):
    pytest.importorskip("matplotlib")
    rd = tmp_path / "runs"
    # 6 steps: thirds are steps 1-2, 3-4, 5-6; the window moves up the batch's perplexity
    sel = lambda step: {"rho": step / 6, "prompt_ids": [step, step + 1], "levels": [step, None],  # noqa: E731
                        "ppl": [step, step + 2], "pass_rate": [1.0, 0.5 if step > 3 else 0.0],
                        "cand_ppl": {"p10": 1.0, "p50": 4.0, "p90": 8.0}}
    for k in (1, 2):
        write_run(rd, "random", k, [0.3, 0.4, 0.5])   # older runs: no selection.jsonl
        write_run(rd, "prepo", k, [0.3, 0.4, 0.5], picked=sel)
    b = bench_file(tmp_path, seeds=[1, 2])
    out = report.write_report(b, rd, tmp_path / "res", "cmd", "cfg.yaml")
    rows = {r.strategy: r for r in out["aggregate"].rows}
    assert rows["random"].diagnostics.selection_phases == {}
    ph = rows["prepo"].diagnostics.selection_phases
    assert ph["ppl"] == pytest.approx([2.5, 4.5, 6.5]) and ph["cand_ppl_p50"] == [4.0, 4.0, 4.0]
    assert ph["pass_rate"] == pytest.approx([0.5, 0.625, 0.75]) and ph["level"] == pytest.approx([1.5, 3.5, 5.5])
    md = out["markdown"]
    assert "## What the curriculum rolled out, by third of the run" in md
    assert "| prepo | 2.50 / 4.50 / 6.50 | 4.00 / 4.00 / 4.00 | 50.0 / 62.5 / 75.0 | 1.50 / 3.50 / 5.50 |" in md
    assert "| random |" not in md.split("## What the curriculum")[1].split("##")[0]


def test_smollm2_testbed_config_is_preregistered_and_valid():
    path = ROOT / "benchmarks" / "configs" / "testbed_smollm2.yaml"
    bench = config.load_bench_config(path)
    assert (ROOT / "benchmarks" / "preregistration" / "testbed_smollm2.md").exists()
    assert bench.strategies == ["random", "prepo", "ppl_only", "entropy_only"] and bench.seeds == [11, 12, 13]
    assert bench.primary == "half_budget_threshold" and bench.jobs == 1
    assert not set(bench.seeds) & set(bench.tuning_seeds)
    # resolved without asking this machine for vLLM (the report is written where it may be missing)
    resolved = config.full_config(config.run_config(bench, "prepo", 11, Path("/tmp/x")), check_environment=False)
    assert resolved == {**config.report_config(bench), "strategy": "prepo", "seed": 11, "output_dir": "/tmp/x/prepo/seed11"}
    wordmath = yaml.safe_load((ROOT / "benchmarks" / "configs" / "smollm2_wordmath.yaml").read_text())["train"]
    for key in ("model", "task", "chat_template", "instruction_suffix", "temperature", "max_new_tokens"):
        assert resolved[key] == wordmath[key], key
    assert resolved["rollout_engine"] == "vllm" and resolved["save_every"] == 1
    # registered: >= 10 evaluations before half the budget (the ratio's resolution <= 0.1)
    assert resolved["eval_every"] <= resolved["total_steps"] / 20
    # the registered metric is one the runs log: greedy accuracy, or avg@k with the runs' k
    assert bench.metric == ("eval_accuracy" if resolved["eval_avg_k"] == 0 else f"eval_avg@{resolved['eval_avg_k']}")
    for key in ("train_size", "lr", "mini_batches"):   # as issue 18's training run (README)
        assert key in resolved


@pytest.mark.slow
def test_harness_end_to_end_archives_and_reaggregates_from_the_archive(tmp_path, tiny_cache_dir):
    """Real tiny runs through the harness: each finished run archived (no checkpoints), the report
    written again from the archive alone, with the curriculum's selection table and the harness's
    command and timing."""
    pytest.importorskip("matplotlib")
    from trainer_harness import TINY

    train = {**TINY, "total_steps": 3, "eval_every": 1, "eval_avg_k": 2, "spearman_prompts": 0,
             "cache_dir": str(tiny_cache_dir), "tensorboard": False}
    cfg = tmp_path / "testbed_e2e.yaml"
    cfg.write_text(yaml.safe_dump({"strategies": ["random", "prepo"], "seeds": [1], "metric": "eval_avg@2",
                                   "primary": "half_budget_threshold", "train": train}))
    rd, res = tmp_path / "runs", tmp_path / "results"
    common = ["--config", str(cfg), "--runs-dir", str(rd), "--results-dir", str(res)]
    assert rollout_efficiency.main(common) == 0
    assert (rd / "prepo" / "seed1" / "checkpoints").is_dir()
    archive = runs.read_archive(res / "testbed_e2e_runs.json.gz")   # beside the report by default
    assert sorted(archive["runs"]) == ["prepo/seed1", "random/seed1"]
    assert sorted(archive["runs"]["prepo/seed1"]) == sorted(runs.RUN_FILES)
    assert archive["harness"] == json.loads((rd / "harness.json").read_text())
    first = (res / "testbed_e2e.md").read_text()
    shutil.rmtree(rd)
    assert rollout_efficiency.main(common + ["--aggregate-only"]) == 0
    again = (res / "testbed_e2e.md").read_text()
    table = lambda md: md.split("## Diagnostics")[0].split("\n| strategy |")[1]  # noqa: E731
    assert table(again) == table(first) and "Incomplete" not in again
    ran = lambda md: [line for line in md.splitlines() if line.startswith(("Command:", "Wall time"))]  # noqa: E731
    assert ran(first)[1:] == ran(again)[1:] and "(aggregated with:" in ran(again)[0]
    assert "## What the curriculum rolled out" in again and "half-budget accuracy" in again
    sel = again.split("## What the curriculum rolled out")[1].split("\n\n")[1]
    assert "| prepo | " in sel and "| random | - / - / - |" in sel   # random does not score prompts


# ---------------------------------------------------------------- t and sign-flip intervals
def test_t_interval_hand_checked():
    # mean 2, sd 1, n 3: t(0.975, 2 df) = 4.302653, half width 4.302653 / sqrt(3) = 2.484138
    lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == (pytest.approx(2 - 2.484138), pytest.approx(2 + 2.484138))
    assert stats.t_interval([0.4]) == (-math.inf, math.inf)   # one seed: no spread to scale by
    assert stats.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="one value per seed"):
        stats.t_interval([])


def test_t_interval_of_the_log_ratio():
    # log ratios -ln 2, 0, ln 2: mean 0, sd ln 2 -> exp(+-4.302653 * ln 2 / sqrt 3) = 0.178731 / 5.594998
    e = stats.paired_estimate([0.5, 1.0, 2.0], stats.geometric_mean, interval="t")
    assert e.estimate == pytest.approx(1.0) and (e.lo, e.hi) == (pytest.approx(0.178731), pytest.approx(5.594998))
    d = stats.paired_estimate([0.1, 0.2, 0.3], interval="t")   # a mean difference: not on the log scale
    assert d.estimate == pytest.approx(0.2) and d.hi == pytest.approx(0.2 + 0.2484138)
    assert stats.paired_estimate([0.5, 1.0, 2.0], stats.geometric_mean).lo != pytest.approx(0.178731)   # bootstrap
    with pytest.raises(ValueError, match="interval must be one of bootstrap, t"):
        stats.paired_estimate([1.0, 2.0], interval="z")


def test_sign_flip_pvalue_and_interval():
    # all six values above 0: only the identity and the all-flip reach |21|: p = 2 / 64
    assert stats.sign_flip_pvalue([1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    assert stats.sign_flip_pvalue([1, 2, 3, 4, 5, 6], mu=3.5) == 1.0
    assert stats.sign_flip_interval([1, 2, 3, 4, 5]) == (-math.inf, math.inf)   # 2 / 32 > 0.05: nothing rejected
    lo, hi = stats.sign_flip_interval([1.0] * 6)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # against a brute-force scan of the means the test accepts
    x = [0.3, -0.2, 0.9, 0.1, 0.4, 1.2, -0.5, 0.6, 0.2]
    lo, hi = stats.sign_flip_interval(x)
    grid = np.arange(-1.0, 1.5, 1e-3)
    accepted = grid[[stats.sign_flip_pvalue(x, mu) > 0.05 for mu in grid]]
    assert lo == pytest.approx(accepted.min(), abs=2e-3) and hi == pytest.approx(accepted.max(), abs=2e-3)
    tlo, thi = stats.t_interval(x)
    assert abs(lo - tlo) < 0.2 and abs(hi - thi) < 0.2   # near the t interval on well-behaved data
    with pytest.raises(ValueError, match="1 to 20 values"):
        stats.sign_flip_interval(np.zeros(21))


def test_a_degenerate_seed_is_left_out_of_the_ratio():
    base = {1: run_data(1, [(0, 0.5), (100, 0.4), (200, 0.5)], "random"),   # final 0.5 = its initial: degenerate
            2: run_data(2, [(0, 0.2), (100, 0.6), (200, 0.6)], "random")}   # final 0.6, reached at 100
    strat = {1: run_data(1, [(0, 0.5), (100, 0.6), (200, 0.7)]), 2: run_data(2, [(0, 0.2), (100, 0.3), (200, 0.6)])}
    c = stats.compare(strat, base, 1)
    assert c.ratio.per_seed == pytest.approx([2.0]) and c.final_diff.per_seed == pytest.approx([0.2, 0.0])


# ---------------------------------------------------------------- the sequential rule
def seq_bench(tmp_path, seeds=(1, 2, 3, 4), first=2, block=1, **keys):
    return bench_file(tmp_path, "testbed_seq", seeds=list(seeds), interval="t", primary="final_threshold",
                      strategies=["random", "oracle_level", "prepo"],
                      sequential={"compare": "prepo", "control": "oracle_level", "first": first, "block": block}, **keys)


# random reaches its final 0.5 at its last evaluation (60 rollouts); prepo curves by the ratio they give
RANDOM_CURVE = [0.3, 0.4, 0.5]
PREPO_CURVES = {1 / 3: [0.5, 0.6, 0.6], 2 / 3: [0.3, 0.5, 0.5], 1.0: [0.3, 0.4, 0.5]}


def write_seed(rd, seed, ratio, oracle_ratio=1 / 3):
    write_run(rd, "random", seed, RANDOM_CURVE, initial=0.2)
    write_run(rd, "oracle_level", seed, PREPO_CURVES[oracle_ratio], initial=0.2)
    write_run(rd, "prepo", seed, PREPO_CURVES[ratio], initial=0.2)


def test_sequential_rule_stops_on_a_narrow_interval_and_at_the_cap(tmp_path):
    from efficiency import sequential

    b = seq_bench(tmp_path)
    rd = tmp_path / "runs"
    st = sequential.status(b, {})
    assert (st.done, st.needed, st.cap, st.complete, st.looks) == (0, 2, 4, False, [])
    write_seed(rd, 1, 1 / 3)
    write_seed(rd, 2, 1 / 3)
    loaded = runs.load_finished(b, [rd])[0]
    st = sequential.status(b, loaded)
    assert st.complete and st.needed == 2 and st.looks[0].width == pytest.approx(0.0)
    assert st.looks[0].stop == "interval width 0.00 < 0.41"
    # the same ratios except seed 2's: the first look is wide, so the rule asks for seed 3
    write_run(rd / "x", "prepo", 2, PREPO_CURVES[1.0], initial=0.2)
    loaded["prepo"][2] = runs.load_run(config.run_dir_of(rd / "x", "prepo", 2), "prepo", 2, METRIC)
    st = sequential.status(b, loaded)
    assert (st.done, st.needed, st.complete, st.looks[0].stop) == (2, 3, False, "")
    assert st.looks[0].width > 0.41 and st.looks[0].sign_flip == (0.0, math.inf)   # 2 seeds: unbounded
    # a seed missing one strategy is not done, and nor is any seed after it
    del loaded["oracle_level"][1]
    assert sequential.paired_seeds_done(loaded, b.strategies, b.seeds) == 0
    # at the cap the rule stops whatever the width
    loaded = {s: {k: runs.load_run(config.run_dir_of(rd, s, min(k, 2)), s, k, METRIC) for k in (1, 2, 3, 4)}
              for s in b.strategies}
    loaded["prepo"][2] = runs.load_run(config.run_dir_of(rd / "x", "prepo", 2), "prepo", 2, METRIC)
    st = sequential.status(b, loaded)
    assert [lk.seeds for lk in st.looks] == [2, 3, 4] and st.complete and st.looks[-1].stop.startswith("the cap")


def test_run_seconds_adds_steps_and_evaluations(tmp_path):
    from efficiency import sequential

    write_run(tmp_path, "random", 1, [0.3, 0.4], initial=0.2,
              edit=lambda i, m: m.times.update(time_step=10.0 * (i + 1)))
    run = runs.load_run(config.run_dir_of(tmp_path, "random", 1), "random", 1, METRIC)
    init = json.loads((config.run_dir_of(tmp_path, "random", 1) / "initial.json").read_text())
    run.initial = {**init, "eval": {**init["eval"], "time_eval": 5.0}}
    # steps 10 + 20 + 30 + 40, two evaluations of 0.1 s, the step-0 one of 5 s
    assert sequential.run_seconds(run) == pytest.approx(100 + 0.2 + 5)


def test_sequential_report_incomplete_then_complete(tmp_path):
    pytest.importorskip("matplotlib")
    b = seq_bench(tmp_path, seeds=(1, 2, 3, 4, 5, 6), first=3, block=3)
    rd, res = tmp_path / "runs", tmp_path / "res"
    out = report.write_report(b, rd, res, "cmd", "cfg.yaml")
    assert out["aggregate"] is None and "**Incomplete: 0 of 3 paired seeds done**" in out["markdown"]
    assert "- prepo/seed3: not finished" in out["markdown"] and "seed4" not in out["markdown"]   # not due yet
    write_seed(rd, 1, 1 / 3)
    write_seed(rd, 2, 1.0)
    write_run(rd, "random", 3, RANDOM_CURVE, initial=0.2)
    out = report.write_report(b, rd, res, "cmd", "cfg.yaml")
    md = out["markdown"]
    assert "**Incomplete: 2 of 3 paired seeds done**" in md and "inconclusive (interim)" in md
    assert "Positive control `oracle_level` against random on 2 paired seeds: 0.33 [0.33, 0.33], saves rollouts (interim)." in md
    assert "## Time per run and per block (minutes)" in md and "| **block 1-3** |" in md
    write_seed(rd / "more", 3, 2 / 3)
    for s in ("oracle_level", "prepo"):
        shutil.copytree(config.run_dir_of(rd / "more", s, 3), config.run_dir_of(rd, s, 3))
    out = report.write_report(b, rd, res, "cmd", "cfg.yaml")
    md, st = out["markdown"], out["status"]
    # log ratios ln(1/3), 0, ln(2/3): the t interval is far wider than 0.41, so the rule adds a block
    assert not st.complete and st.needed == 6 and "**Incomplete: 3 of 6 paired seeds done**" in md
    assert "| 3 | 0.61 [" in md and "| add a block |" in md
    for k in (4, 5, 6):
        write_seed(rd, k, 1 / 3)
    out = report.write_report(b, rd, res, "cmd", "cfg.yaml")
    md = out["markdown"]
    assert out["status"].complete and "**Complete: the rule stopped at 6 paired seeds (the cap" in md
    assert "(interim)" not in md and "Positive control `oracle_level` against random on 6 paired seeds: 0.33" in md
    assert "Mean per run" in md and "per whole block of 3 seeds x 3 strategies" in md and "(2 blocks)" in md
    assert json.loads((res / "testbed_seq.json").read_text())["sequential"]["needed"] == 6


def test_the_control_that_shows_no_saving_is_said_to_bound_the_harness(tmp_path):
    pytest.importorskip("matplotlib")
    b = seq_bench(tmp_path, seeds=(1, 2), first=2, block=1)
    rd = tmp_path / "runs"
    for k in (1, 2):
        write_seed(rd, k, 1 / 3, oracle_ratio=1.0)
    md = report.write_report(b, rd, tmp_path / "res", "cmd", "cfg.yaml")["markdown"]
    assert "**Complete: the rule stopped at 2 paired seeds (interval width 0.00 < 0.41).**" in md
    assert "Even the control shows no saving at this many seeds" in md


def test_run_sequential_runs_block_by_block_until_the_rule_stops(tmp_path, monkeypatch):
    """The harness loop with the trainer process replaced by one that writes a finished run (the
    runs' ratios chosen per seed): seed by seed, each block only when the rule asks for it."""
    b = seq_bench(tmp_path, seeds=(1, 2, 3, 4), first=2, block=1)
    rd, archive = tmp_path / "runs", tmp_path / "res" / "testbed_seq_runs.json.gz"
    ratios = {1: 1 / 3, 2: 1.0, 3: 1 / 3, 4: 2 / 3}
    launched = []

    def fake_launch(cfg, resume):
        s, k = cfg["strategy"], cfg["seed"]
        launched.append((s, k))
        curve = RANDOM_CURVE if s == "random" else PREPO_CURVES[ratios[k] if s == "prepo" else 1 / 3]
        d = write_run(rd, s, k, curve, initial=0.2)
        (d / "config.yaml").write_text(yaml.safe_dump(config.full_config(cfg)))
        return 0, 1.0

    monkeypatch.setattr(runner, "launch", fake_launch)
    timing = runner.run_sequential(b, rd, archive=archive)
    assert launched == [(s, k) for k in (1, 2, 3, 4) for s in ("random", "oracle_level", "prepo")]
    assert len(timing["run_seconds"]) == 12 and sorted(runs.read_archive(archive)["runs"])[:3] == [
        "oracle_level/seed1", "oracle_level/seed2", "oracle_level/seed3"]
    # equal ratios: the first look (2 seeds) stops it
    ratios.update({2: 1 / 3})
    launched.clear()
    shutil.rmtree(rd)
    runner.run_sequential(b, rd)
    assert launched == [(s, k) for k in (1, 2) for s in ("random", "oracle_level", "prepo")]


def test_aggregate_only_with_no_runs_prints_an_incomplete_report(tmp_path, capsys):
    path = ROOT / "benchmarks" / "configs" / "testbed_smollm2_r4.yaml"
    res = tmp_path / "res"
    assert rollout_efficiency.main(["--config", str(path), "--aggregate-only", "--runs-dir", str(tmp_path / "runs"),
                                    "--results-dir", str(res), "--runs-archive", str(tmp_path / "none.json.gz")]) == 0
    assert "INCOMPLETE: 0 of 9 paired seeds done (cap 15)" in capsys.readouterr().out
    md = (res / "testbed_smollm2_r4.md").read_text()
    assert "**Incomplete: 0 of 9 paired seeds done**" in md and md.count("not finished") == 27


def test_smollm2_r4_config_is_preregistered_and_valid():
    from prepo.config import from_dict
    from prepo.sources import load_data

    path = ROOT / "benchmarks" / "configs" / "testbed_smollm2_r4.yaml"
    bench = config.load_bench_config(path)
    assert (ROOT / "benchmarks" / "preregistration" / "testbed_smollm2_r4.md").exists()
    assert bench.strategies == ["random", "oracle_level", "prepo"] and bench.seeds == list(range(21, 36))
    assert bench.sequential == config.Sequential("prepo", 9, 3, "oracle_level") and bench.interval == "t"
    used_before = {0, 1, 2, 3, 11, 12, 13, 14, 15, 20, 101, 102}   # earlier studies, tuning and this pilot
    assert not set(bench.seeds) & used_before and 20 in bench.tuning_seeds
    resolved = {s: config.full_config(config.run_config(bench, s, 21, Path("/tmp/x")), check_environment=False)
                for s in bench.strategies}
    assert (resolved["prepo"]["ppl_scope"], resolved["prepo"]["curriculum_direction"]) == ("prompt", "high_to_low")
    assert resolved["random"]["curriculum_direction"] == "low_to_high"   # no window to turn
    same = {k for k in resolved["random"] if k not in ("strategy", "output_dir", "ppl_scope", "curriculum_direction")}
    assert all(resolved["prepo"][k] == resolved["random"][k] == resolved["oracle_level"][k] for k in same)
    wordmath = yaml.safe_load((ROOT / "benchmarks" / "configs" / "smollm2_wordmath.yaml").read_text())["train"]
    for key in ("model", "task", "chat_template", "instruction_suffix", "temperature", "max_new_tokens", "train_size"):
        assert resolved["random"][key] == wordmath[key], key
    r = resolved["random"]
    assert r["eval_every"] == 2 and r["total_steps"] >= 20 and r["eval_avg_k"] == 0 and bench.metric == "eval_accuracy"
    assert round(r["select_ratio"] * r["candidate_batch_size"]) * r["group_size"] == 64   # rollouts a step
    held_out = load_data(from_dict({**r, "rollout_engine": "hf"})).eval
    assert len(held_out) >= 200 and {p.difficulty for p in held_out} == {1, 2, 3, 4}
