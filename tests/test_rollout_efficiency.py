"""Aggregation logic of benchmarks/rollout_efficiency.py on synthetic run directories (no training)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from prepo.metrics import StepMetrics

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("rollout_efficiency", ROOT / "benchmarks" / "rollout_efficiency.py")
re_bench = importlib.util.module_from_spec(_spec)
sys.modules["rollout_efficiency"] = re_bench  # dataclasses look their module up there
_spec.loader.exec_module(re_bench)

METRIC = "eval_accuracy"


def write_run(runs_dir: Path, strategy: str, seed: int, curve, *, per_step: int = 10, eval_every: int = 2,
              initial=None, spearman=None, dynamic=False, zero_adv=0.25, weights=(0.8, 1.3)):
    """A run dir like the trainer's: metrics.jsonl (one row a step, eval_accuracy every
    ``eval_every`` steps), eval.jsonl (step 0 + evals), initial.json, summary.json.
    ``curve`` lists the accuracies at the evaluations after step 0."""
    d = re_bench.run_dir_of(runs_dir, strategy, seed)
    d.mkdir(parents=True)
    steps = eval_every * len(curve)
    rows, evals = [], [{"step": 0, "rollouts": 0, "accuracy": initial}] if initial is not None else []
    rollouts = 0
    for s in range(1, steps + 1):
        step_r = per_step * (2 if dynamic and s % 2 else 1)
        rollouts += step_r
        m = {"step": s, "rollouts": rollouts, "step_rollouts": step_r, "reward_mean": 0.5,
             "zero_adv_frac": 0.0 if dynamic else zero_adv, "entropy_mean": 1.0 - s / (10 * steps),
             "weight_min": weights[0], "weight_max": weights[1], "weight_applied": strategy == "prepo",
             "selected_difficulty": 2.0}
        if dynamic:
            m.update({"dynamic_groups_generated": 4 if s % 2 else 2, "dynamic_groups_kept": 2})
        if s % eval_every == 0:
            m["eval_accuracy"] = curve[s // eval_every - 1]
            evals.append({"step": s, "rollouts": rollouts, "accuracy": m["eval_accuracy"]})
        rows.append(m)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    init = {"eval": {"accuracy": initial}} if initial is not None else {}
    if spearman is not None:
        init.update({"spearman_ppl_passrate": spearman, "spearman_pvalue": 0.01, "n_prompts": 50, "samples": 8,
                     "pass_rate_mean": 0.4, "pass_rate_hist": [1, 2, 3, 4, 5]})
    (d / "initial.json").write_text(json.dumps(init))
    (d / "summary.json").write_text(json.dumps({"steps": steps, "rollouts": rollouts, "train_seconds_this_process": 1.0}))
    return d


# ---------------------------------------------------------------- rollouts-to-threshold
def test_rollouts_to_threshold_first_crossing():
    curve = [(0, 0.1), (100, 0.3), (200, 0.5), (300, 0.4), (400, 0.6)]
    assert re_bench.rollouts_to_threshold(curve, 0.5) == 200  # first reach, not the last
    assert re_bench.rollouts_to_threshold(curve, 0.45) == 200
    assert re_bench.rollouts_to_threshold(curve, 0.6) == 400
    assert re_bench.rollouts_to_threshold(curve, 0.1) == 0    # reached before training
    assert re_bench.rollouts_to_threshold(curve, 0.61) is None


def test_rollouts_to_threshold_float_equality_counts_as_reached():
    accs = [0.1, 0.2, 0.7]
    thr = sum(accs) / 3  # a mean that is itself one of the values up to rounding
    assert re_bench.rollouts_to_threshold([(0, 0.0), (50, thr)], sum(accs) / 3) == 50
    assert re_bench.rollouts_to_threshold([(0, 0.0), (50, 1 / 3)], (0.1 + 0.2 + 0.7) / 3) == 50


# ---------------------------------------------------------------- ratio and not-reached
def test_rollouts_summary_and_ratio_all_reached():
    s = re_bench.rollouts_summary([100, 200, 300], [1000, 1000, 1000])
    b = re_bench.rollouts_summary([400, 400, 400], [1000, 1000, 1000])
    assert s["n_reached"] == 3 and s["mean_reached"] == 200 and s["mean_bounded"] == 200
    r = re_bench.ratio_vs_baseline(s, b)
    assert r["ratio"] == pytest.approx(0.5) and r["qualifier"] == "="


def test_not_reached_counts_at_budget_as_lower_bound():
    s = re_bench.rollouts_summary([100, None, 300], [1000, 1200, 1000])
    assert s["n_reached"] == 2 and s["mean_reached"] == 200
    assert s["mean_bounded"] == pytest.approx((100 + 1200 + 300) / 3)
    b = re_bench.rollouts_summary([400, 400, 400], [1000] * 3)
    r = re_bench.ratio_vs_baseline(s, b)
    assert r["qualifier"] == ">=" and r["ratio"] == pytest.approx(((100 + 1200 + 300) / 3) / 400)


def test_baseline_not_reached_is_not_a_bound():
    s = re_bench.rollouts_summary([100, 100], [500, 500])
    b = re_bench.rollouts_summary([200, None], [500, 500])
    assert re_bench.ratio_vs_baseline(s, b)["qualifier"] == "~"


def test_nobody_reached():
    s = re_bench.rollouts_summary([None, None], [500, 600])
    assert s["mean_reached"] is None and s["n_reached"] == 0 and s["mean_bounded"] == 550


def test_zero_over_zero_is_na():
    s = re_bench.rollouts_summary([0, 0], [500, 500])
    r = re_bench.ratio_vs_baseline(s, s)
    assert r["ratio"] is None and r["qualifier"] == "n/a"


# ---------------------------------------------------------------- whole aggregation from files
@pytest.fixture
def runs(tmp_path):
    rd = tmp_path / "runs"
    # random: finals 0.5, 0.6, 0.7 -> threshold 0.6
    write_run(rd, "random", 1, [0.3, 0.4, 0.5], initial=0.2, spearman=-0.2)
    write_run(rd, "random", 2, [0.3, 0.6, 0.6], initial=0.2, spearman=-0.3)
    write_run(rd, "random", 3, [0.4, 0.5, 0.7], initial=0.2, spearman=-0.1)
    # prepo reaches 0.6 after the first eval on every seed; one seed never reaches it
    write_run(rd, "prepo", 1, [0.6, 0.7, 0.7], initial=0.2, spearman=-0.2, weights=(0.5, 2.0))
    write_run(rd, "prepo", 2, [0.65, 0.7, 0.8], initial=0.2, spearman=-0.3)
    write_run(rd, "prepo", 3, [0.4, 0.5, 0.55], initial=0.2, spearman=-0.1)
    # dapo: more rollouts per step
    for k in (1, 2, 3):
        write_run(rd, "dapo_dynamic", k, [0.5, 0.6, 0.6], initial=0.2, spearman=-0.2, dynamic=True)
    return rd


def test_aggregate_from_files(runs):
    loaded = re_bench.load_runs(runs, ["random", "prepo", "dapo_dynamic"], [1, 2, 3], METRIC)
    assert loaded["random"][1].curve == [(0, 0.2), (20, 0.3), (40, 0.4), (60, 0.5)]
    agg = re_bench.aggregate(loaded, "random")
    assert agg["threshold"] == pytest.approx(0.6)
    assert not agg["degenerate_threshold"]
    rows = {r["strategy"]: r for r in agg["rows"]}
    assert agg["rows"][0]["strategy"] == "random"

    rnd = rows["random"]
    assert rnd["final_mean"] == pytest.approx(0.6)
    assert rnd["final_std"] == pytest.approx(0.1)
    assert rnd["rollouts_to_threshold"] == [None, 40, 60]
    assert rnd["rt_mean_reached"] == 50 and rnd["rt_n_reached"] == 2
    assert rnd["rt_mean_bounded"] == pytest.approx((60 + 40 + 60) / 3)
    assert rnd["ratio_ratio"] == pytest.approx(1.0) and rnd["ratio_qualifier"] == "~"

    pp = rows["prepo"]
    assert pp["rollouts_to_threshold"] == [20, 20, None]
    assert pp["rt_mean_bounded"] == pytest.approx((20 + 20 + 60) / 3)
    assert pp["ratio_ratio"] == pytest.approx(((20 + 20 + 60) / 3) / ((60 + 40 + 60) / 3))
    assert pp["weight_min"] == 0.5 and pp["weight_max"] == 2.0 and pp["weight_applied"]
    assert pp["zero_adv_frac"] == pytest.approx(0.25)

    dd = rows["dapo_dynamic"]
    # 6 steps: odd steps 20 rollouts, even 10 -> evals at 30, 60, 90
    assert dd["rollouts_to_threshold"] == [60, 60, 60]
    assert dd["budget_rollouts"] == [90, 90, 90]
    assert dd["zero_adv_frac"] == 0.0
    # 3 odd steps generate 4 keep 2, 3 even generate 2 keep 2 -> 6 dropped of 18
    assert dd["generated_zero_adv_frac"] == pytest.approx(6 / 18)

    sp = agg["spearman"]
    assert sp["mean"] == pytest.approx(-0.2) and sorted(sp["per_seed"]) == [1, 2, 3]


def test_degenerate_threshold_flagged(tmp_path):
    rd = tmp_path / "runs"
    for k in (1, 2):
        write_run(rd, "random", k, [0.2, 0.25], initial=0.3)  # training made it worse
        write_run(rd, "prepo", k, [0.1, 0.2], initial=0.3)
    agg = re_bench.aggregate(re_bench.load_runs(rd, ["random", "prepo"], [1, 2], METRIC), "random")
    assert agg["degenerate_threshold"]
    rows = {r["strategy"]: r for r in agg["rows"]}
    assert rows["prepo"]["rollouts_to_threshold"] == [0, 0]
    assert rows["prepo"]["ratio_ratio"] is None
    assert any("does not exceed the initial" in s for s in re_bench.findings(agg, METRIC))


def test_curve_without_step0_and_avg_metric(tmp_path):
    rd = tmp_path / "runs"
    d = write_run(rd, "random", 1, [0.3, 0.4])
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        if "eval_accuracy" in m:
            m["eval_avg@8"] = m["eval_accuracy"] / 2
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    r = re_bench.load_run(d, "random", 1, "eval_avg@8")
    assert r.curve == [(20, 0.15), (40, 0.2)] and r.initial_acc is None and r.greedy_final == 0.4
    with pytest.raises(ValueError):
        re_bench.load_run(d, "random", 1, "eval_avg@16")


def test_missing_run_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        re_bench.load_runs(tmp_path, ["random"], [1], METRIC)


def test_report_writes_files_and_readme(runs, tmp_path):
    pytest.importorskip("matplotlib")
    bench = {"strategies": ["random", "prepo", "dapo_dynamic"], "seeds": [1, 2, 3], "tuning_seeds": [101],
             "baseline": "random", "metric": METRIC, "jobs": 1, "runs_dir": str(runs), "train": {"total_steps": 6}}
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    res_dir = tmp_path / "results"
    out = re_bench.report(bench, runs, res_dir, "python benchmarks/rollout_efficiency.py", "cfg.yaml", readme=readme)
    for ext in ("md", "csv", "png", "json"):
        assert (res_dir / f"rollout_efficiency.{ext}").exists()
    assert (res_dir / "rollout_efficiency_diagnostics.png").exists()
    md = (res_dir / "rollout_efficiency.md").read_text()
    assert "not reached" in md and "| prepo |" in md and "≥" in md and "Spearman" in md
    text = readme.read_text()
    assert text.startswith("# project") and text.count(re_bench.README_BEGIN) == 1
    re_bench.update_readme(readme, "table v2")  # replaced in place, not appended twice
    text = readme.read_text()
    assert text.count(re_bench.README_BEGIN) == 1 and "table v2" in text and "| prepo |" not in text


def test_bench_config_committed_is_valid():
    bench = re_bench.load_bench_config(re_bench.DEFAULT_CONFIG)
    assert bench["baseline"] == "random"
    assert {"random", "prepo", "ppl_only", "entropy_only", "static_low_ppl", "dapo_dynamic"} <= set(bench["strategies"])
    assert len(bench["seeds"]) >= 3
    assert all(s >= 100 or s == 0 for s in bench["tuning_seeds"])  # 0: the trainer's development seed
    assert not set(bench["seeds"]) & set(bench["tuning_seeds"])
    for quick in (False, True):
        b = re_bench.load_bench_config(re_bench.DEFAULT_CONFIG, quick=quick)
        re_bench._full_config(re_bench.run_config(b, b["baseline"], b["seeds"][0], Path("/tmp/x")))  # trainer accepts it
    q = re_bench.load_bench_config(re_bench.DEFAULT_CONFIG, quick=True)
    assert q["train"]["total_steps"] < bench["train"]["total_steps"]


def test_reported_seed_used_for_tuning_is_refused(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump({"strategies": ["random"], "seeds": [1, 2], "tuning_seeds": [2]}))
    with pytest.raises(SystemExit, match="tuning"):
        re_bench.load_bench_config(p)


def test_run_status_detects_mismatch_and_done(tmp_path):
    cfg = {"strategy": "random", "seed": 1, "total_steps": 4, "output_dir": str(tmp_path / "r")}
    d = Path(cfg["output_dir"])
    assert re_bench.run_status(d, cfg)[0] == "new"
    d.mkdir()
    full = re_bench._full_config(cfg)
    (d / "config.yaml").write_text(yaml.safe_dump(full))
    assert re_bench.run_status(d, cfg)[0] == "new"
    (d / "summary.json").write_text(json.dumps({"steps": 4}))
    assert re_bench.run_status(d, cfg)[0] == "done"
    status, diff = re_bench.run_status(d, dict(cfg, lr=1e-5))
    assert status == "mismatch" and diff == ["lr"]
    # keys that cannot change the result do not count
    assert re_bench.run_status(d, dict(cfg, progress=False))[0] == "done"


def test_optional_weight_spread_keys_are_reported(tmp_path):
    rd = tmp_path / "runs"
    write_run(rd, "random", 1, [0.3, 0.4], initial=0.2)
    d = write_run(rd, "prepo", 1, [0.3, 0.5], initial=0.2)
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    for m in rows:
        m.update({"weight_p10": 0.8, "weight_p90": 1.2})
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
    agg = re_bench.aggregate(re_bench.load_runs(rd, ["random", "prepo"], [1], METRIC), "random")
    pp = {r["strategy"]: r for r in agg["rows"]}["prepo"]
    assert pp["weight_p10_mean"] == pytest.approx(0.8) and pp["greso_skipped_mean"] is None
    assert any("p10 0.80, p90 1.20" in s for s in re_bench.findings(agg, METRIC))


def test_smoothed_variant():
    sm = re_bench.smooth_curve([(0, 0.0), (10, 0.3), (20, 0.6), (30, 0.3)], 3)
    assert [x for x, _ in sm] == [0, 10, 20, 30]
    assert [a for _, a in sm] == pytest.approx([0.0, 0.15, 0.3, 0.4])
    assert re_bench.smooth_curve([(0, 0.2), (10, 0.4)], 1) == [(0, 0.2), (10, 0.4)]


def test_report_has_smoothed_table(runs, tmp_path):
    pytest.importorskip("matplotlib")
    bench = {"strategies": ["random", "prepo"], "seeds": [1, 2, 3], "tuning_seeds": [], "baseline": "random",
             "metric": METRIC, "jobs": 1, "runs_dir": str(runs), "train": {"total_steps": 6}}
    out = re_bench.report(bench, runs, tmp_path / "res", "cmd", "cfg.yaml")
    sm = out["aggregate"]["smoothed"]
    # random's last-3 means: 0.4, 0.5, 0.5333 -> threshold 0.4778
    assert sm["threshold"] == pytest.approx((0.4 + 0.5 + 1.6 / 3) / 3)
    assert "trailing mean over 3 evaluations" in out["markdown"]


def test_levels_table(tmp_path):
    pytest.importorskip("matplotlib")
    rd = tmp_path / "runs"
    for s in ("random", "prepo"):
        d = write_run(rd, s, 1, [0.3, 0.4], initial=0.2)
        evals = [json.loads(l) for l in (d / "eval.jsonl").read_text().splitlines()]
        for e in evals:
            e.update({"accuracy_level0": 1.0, "accuracy_level1": e["accuracy"] / 2})
        (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    bench = {"strategies": ["random", "prepo"], "seeds": [1], "tuning_seeds": [], "baseline": "random",
             "metric": METRIC, "jobs": 1, "runs_dir": str(rd), "train": {"total_steps": 4}}
    out = re_bench.report(bench, rd, tmp_path / "res", "cmd", "cfg.yaml")
    row = out["aggregate"]["rows"][0]
    assert row["levels_initial"] == {0: 1.0, 1: 0.1} and row["levels_final"] == {0: 1.0, 1: 0.2}
    assert "| (initial policy) | 100.0 | 10.0 |" in out["markdown"]


def test_rows_are_read_as_step_records_and_greso_skips_reported(tmp_path):
    rd = tmp_path / "runs"
    write_run(rd, "random", 1, [0.3, 0.4], initial=0.2)
    d = write_run(rd, "greso", 1, [0.3, 0.5], initial=0.2)
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    for i, m in enumerate(rows):
        m.update({"greso_skipped": i % 2 * 3, "greso_backfilled": 0, "greso_p_easy": 0.5, "greso_p_hard": 0.5})
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
    runs = re_bench.load_runs(rd, ["random", "greso"], [1], METRIC)
    r = runs["greso"][1]
    assert isinstance(r.metrics[0], StepMetrics) and r.metrics[1].selection["greso_skipped"] == 3
    agg = re_bench.aggregate(runs, "random")
    g = {x["strategy"]: x for x in agg["rows"]}["greso"]
    assert g["greso_skipped_mean"] == pytest.approx(1.5) and r.total_rollouts == rows[-1]["rollouts"]
    assert any("greso 1.50" in s for s in re_bench.findings(agg, METRIC))


def test_bench_config_accepts_the_trainer_strategies_only(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("strategies: [random, static_high_ppl, greso]\nseeds: [1]\n")
    assert re_bench.load_bench_config(cfg)["strategies"] == ["random", "static_high_ppl", "greso"]
    cfg.write_text("strategies: [random, gresso]\nseeds: [1]\n")
    with pytest.raises(SystemExit, match="unknown strategies \\['gresso'\\]"):
        re_bench.load_bench_config(cfg)
