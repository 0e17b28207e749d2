"""End-to-end tests of ``python -m prepo.train`` with a tiny config (tiny warm-up, few steps)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer_harness import REPO, TINY, cmd, env, metrics


@pytest.mark.slow
def test_two_step_run(tmp_path, tiny_cache_dir):
    out = tmp_path / "run"
    cfg = {**TINY, "total_steps": 2, "output_dir": out, "cache_dir": tiny_cache_dir, "tensorboard": True}
    res = subprocess.run(cmd(cfg), cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out greedy accuracy: initial" in res.stdout and "rollouts" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    need = {"step", "rollouts", "reward_mean", "zero_adv_frac", "ppl_window_lo", "ppl_window_hi", "entropy_mean",
            "weight_min", "weight_max", "loss", "clip_frac", "time_score", "time_generate", "time_old_logprob",
            "time_update", "time_sync", "time_select"}
    assert need <= set(rows[0])
    assert rows[0]["rollouts"] == 2 * 4 and rows[1]["rollouts"] == 16   # K=2 prompts x G=4
    assert "eval_accuracy" in rows[1]                                       # evaluated at the end
    # selection.jsonl: a row per step, the K=2 rolled-out prompts in selection order
    picks = [json.loads(line) for line in (out / "selection.jsonl").read_text().splitlines()]
    assert [p["step"] for p in picks] == [1, 2]
    for p, r in zip(picks, rows):
        assert len(p["prompt_ids"]) == len(p["levels"]) == len(p["ppl"]) == len(p["pass_rate"]) == 2
        assert all(0 <= i < TINY["train_size"] for i in p["prompt_ids"]) and p["rho"] == r["rho"]
        assert min(p["ppl"]) == pytest.approx(r["ppl_window_lo"], rel=1e-4)
        assert max(p["ppl"]) == pytest.approx(r["ppl_window_hi"], rel=1e-4)
        assert sum(p["pass_rate"]) / 2 == pytest.approx(r["reward_mean"], abs=1e-4)   # groups of equal size
        assert sum(p["levels"]) / 2 == pytest.approx(r["selected_difficulty"])
        assert p["cand_ppl"]["p10"] <= p["cand_ppl"]["p50"] <= p["cand_ppl"]["p90"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 16 and summary["initial_accuracy"] is not None
    assert (out / "accuracy_vs_rollouts.png").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert any((out / "tb").iterdir())
    # Spearman is undefined (NaN) exactly when every pass rate is equal, else in [-1, 1]
    initial = json.loads((out / "initial.json").read_text())
    assert initial["n_prompts"] == sum(initial["pass_rate_hist"]) == TINY["spearman_prompts"]
    rho = summary["spearman_ppl_passrate"]
    assert rho == initial["spearman_ppl_passrate"] or math.isnan(rho)
    if initial["pass_rate_mean"] in (0.0, 1.0):
        assert math.isnan(rho)
    else:
        assert -1.0 <= rho <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["dapo_dynamic", "static_low_ppl", "static_high_ppl", "entropy_only", "ppl_only",
                                      "oracle_level"])
def test_other_strategy_runs_in_process(tmp_path, tiny_cache_dir, strategy):
    from prepo.train import run

    summary = run({**TINY, "strategy": strategy, "total_steps": 2, "output_dir": str(tmp_path / strategy),
                   "cache_dir": str(tiny_cache_dir), "spearman_prompts": 0, "tensorboard": False, "eval_every": 0})
    rows = metrics(tmp_path / strategy)
    assert len(rows) == 2 and summary["rollouts"] == rows[-1]["rollouts"]
    if strategy == "dapo_dynamic":
        # dynamic sampling counts every generated rollout, kept or dropped
        assert all(r["step_rollouts"] == 4 * r["dynamic_groups_generated"] for r in rows)
    else:
        assert all(r["step_rollouts"] == 2 * 4 for r in rows)
        assert rows[0]["weight_applied"] == (strategy == "entropy_only")
        assert (rows[0]["ppl_window_lo"] is None) == (strategy in ("entropy_only", "oracle_level"))
    picks = [json.loads(line) for line in (tmp_path / strategy / "selection.jsonl").read_text().splitlines()]
    assert [p["step"] for p in picks] == [1, 2]
    # dynamic sampling's refills are not indexed; strategies that do not score prompts log no ppl
    assert all((p["prompt_ids"] is None) == (strategy == "dapo_dynamic") for p in picks)
    assert all((p["ppl"] is None) == (strategy in ("dapo_dynamic", "entropy_only", "oracle_level")) for p in picks)
    if strategy == "oracle_level":   # levels 0-4: a candidate batch of 10 all but surely holds levels 1-3
        assert all(abs(level - 2) <= 1 for p in picks for level in p["levels"])


@pytest.mark.slow
def test_reward_failures_counted_in_run(tmp_path, tiny_cache_dir):
    from prepo.config import from_dict
    from prepo.sources import load_data
    from prepo.train import run

    cfg = {**TINY, "total_steps": 2, "output_dir": str(tmp_path / "r"), "cache_dir": str(tiny_cache_dir),
           "spearman_prompts": 0, "tensorboard": False, "strategy": "random"}
    failed = []   # prompts of the items the reward raised on

    def flaky(prompts, completions, answer, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch scoring is broken")
        if completions[0].endswith("1"):
            failed.append(prompts[0])
            raise ValueError("cannot score")
        return [float(completions[0] == answer[0])]

    run(cfg, reward_fn=flaky)
    rows = metrics(tmp_path / "r")
    train = {p.prompt for p in load_data(from_dict(cfg)).train}   # evaluation's failures are not counted
    expected = sum(p in train for p in failed)
    assert expected > 0 and rows[-1]["reward_failures"] == expected


def test_bad_config_exits_with_message(tmp_path, capsys):
    from prepo.train import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    words = tmp_path / "words.jsonl"
    words.write_text('{"prompt": "What is 1+1?", "answer": "2"}\n')
    for argv, msg in ((["--total-stepz", "2"], "valid keys"), (["--strategy", "nope"], "strategy must be one of"),
                      (["--seed", "x"], "expects an integer"), (["--kernel-impl", "fastest"], "kernel_impl must be"),
                      (["--train-data", str(bad), "--output-dir", str(tmp_path)], "no answer column 'answer'"),
                      (["--train-data", str(words), "--output-dir", str(tmp_path)], "name a model with --model")):
        assert main(argv) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_bad_config_through_the_real_command_line():
    res = subprocess.run([sys.executable, "-m", "prepo.train", "--strategy", "gresso"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "strategy must be one of" in res.stderr, res.stderr[-2000:]


def _kill_after(proc: subprocess.Popen, metrics_path, steps: int, timeout: float = 240) -> None:
    """SIGKILL ``proc`` once ``metrics_path`` holds ``steps`` lines."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= steps:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_cache_dir):
    """A run killed at an arbitrary point and resumed writes what an uninterrupted run writes. GRESO,
    the strategy with the most state (its reward history travels in the checkpoint), on a pool
    small enough that prompts recur; killed after step 5, so the last checkpoint (step 4) is behind
    the metrics file, which resume must truncate."""
    steps = 8
    base = {**TINY, "strategy": "greso", "total_steps": steps, "train_size": 20, "cache_dir": tiny_cache_dir,
            "tensorboard": False, "spearman_prompts": 0}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    res = subprocess.run(cmd({**base, "output_dir": ref_dir}), cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _kill_after(subprocess.Popen(cmd({**base, "output_dir": run_dir}), cwd=REPO, env=env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), run_dir / "metrics.jsonl", 5)
    assert len(metrics(run_dir)) < steps
    res = subprocess.run(cmd({**base, "output_dir": run_dir, "resume": True}), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 4" in res.stderr
    assert metrics(run_dir) == metrics(ref_dir)
    strip = lambda d: [{k: v for k, v in json.loads(l).items() if k != "time_eval"}  # noqa: E731
                       for l in (d / "eval.jsonl").read_text().splitlines()]
    assert strip(run_dir) == strip(ref_dir)
    read = lambda d: (d / "selection.jsonl").read_text().splitlines()  # noqa: E731
    assert read(run_dir) == read(ref_dir) and len(read(ref_dir)) == steps   # no duplicate rows after resume
    rows = metrics(ref_dir)
    assert sum(r["greso_skipped"] + r["greso_backfilled"] for r in rows[2:]) > 0   # the history was used
    assert rows[0]["greso_p_easy"] != 0.5 or rows[0]["greso_p_hard"] != 0.5        # adapted after each step
