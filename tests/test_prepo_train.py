"""End-to-end tests of ``python -m prepo.train`` with a tiny config (tiny warm-up, few steps)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "warmup_steps": 40, "warmup_hidden_size": 32, "warmup_num_layers": 1,
    "warmup_batch_size": 32, "train_size": 200, "eval_per_level": 4, "candidate_batch_size": 10,
    "group_size": 4, "max_new_tokens": 4, "spearman_prompts": 12, "spearman_samples": 4,
    "num_threads": 1, "eval_every": 3, "save_every": 2, "progress": False,
}


def _args(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _cmd(cfg: dict) -> list[str]:
    return [sys.executable, "-m", "prepo.train", *_args(cfg)]


def _metrics(out_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prepo-cache")


def test_two_step_run(tmp_path, cache_dir):
    out = tmp_path / "run"
    cfg = {**TINY, "total_steps": 2, "output_dir": out, "cache_dir": cache_dir, "tensorboard": True}
    res = subprocess.run(_cmd(cfg), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out greedy accuracy: initial" in res.stdout and "rollouts" in res.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    need = {"step", "rollouts", "reward_mean", "zero_adv_frac", "ppl_window_lo", "ppl_window_hi", "entropy_mean",
            "weight_min", "weight_max", "loss", "clip_frac", "time_score", "time_generate", "time_old_logprob",
            "time_update"}
    assert need <= set(rows[0])
    assert rows[0]["rollouts"] == 2 * 4 and rows[1]["rollouts"] == 16   # K=2 prompts x G=4
    assert "eval_accuracy" in rows[1]                                       # evaluated at the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 16 and summary["initial_accuracy"] is not None
    assert (out / "accuracy_vs_rollouts.png").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert any((out / "tb").iterdir())
    assert -1.0 <= summary["spearman_ppl_passrate"] <= 1.0 or summary["spearman_ppl_passrate"] != summary["spearman_ppl_passrate"]


@pytest.mark.parametrize("strategy", ["dapo_dynamic", "static_low_ppl", "static_high_ppl", "entropy_only", "ppl_only"])
def test_other_strategy_runs_in_process(tmp_path, cache_dir, strategy):
    from prepo.train import run

    summary = run({**TINY, "strategy": strategy, "total_steps": 2, "output_dir": str(tmp_path / strategy),
                   "cache_dir": str(cache_dir), "spearman_prompts": 0, "tensorboard": False, "eval_every": 0})
    rows = [json.loads(l) for l in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and summary["rollouts"] == rows[-1]["rollouts"]
    if strategy == "dapo_dynamic":
        # dynamic sampling counts every generated rollout, kept or dropped
        assert all(r["step_rollouts"] == 4 * r["dynamic_groups_generated"] for r in rows)
    else:
        assert all(r["step_rollouts"] == 2 * 4 for r in rows)
        assert rows[0]["weight_applied"] == (strategy == "entropy_only")
        assert (rows[0]["ppl_window_lo"] is None) == (strategy == "entropy_only")


def test_reward_failures_counted_in_run(tmp_path, cache_dir):
    from prepo.train import run

    calls = {"n": 0}

    def flaky(prompts, completions, answer, **kw):
        calls["n"] += 1
        if len(completions) > 1:
            raise RuntimeError("batch scoring is broken")
        if completions[0].endswith("1"):
            raise ValueError("cannot score")
        return [float(completions[0] == answer[0])]

    run({**TINY, "total_steps": 2, "output_dir": str(tmp_path / "r"), "cache_dir": str(cache_dir),
         "spearman_prompts": 0, "tensorboard": False, "strategy": "random"}, reward_fn=flaky)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "reward_failures" in rows[-1] and calls["n"] > 2


def test_bad_config_exits_with_message(tmp_path, capsys):
    from prepo.train import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    words = tmp_path / "words.jsonl"
    words.write_text('{"prompt": "What is 1+1?", "answer": "2"}\n')
    for args, msg in ((["--total-stepz", "2"], "valid keys"), (["--strategy", "nope"], "strategy must be one of"),
                      (["--seed", "x"], "expects an integer"), (["--train-data", str(bad), "--output-dir", str(tmp_path)],
                                                               "no answer column 'answer'"),
                      (["--train-data", str(words), "--output-dir", str(tmp_path)], "name a model with --model")):
        assert main(args) == 2
        assert msg in capsys.readouterr().err
    # and through the real command line
    res = subprocess.run([sys.executable, "-m", "prepo.train", "--strategy", "gresso"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "strategy must be one of" in res.stderr, res.stderr[-2000:]


def test_kill_and_resume_matches_uninterrupted(tmp_path, cache_dir):
    steps = 24
    base = {**TINY, "total_steps": steps, "cache_dir": cache_dir, "tensorboard": False, "spearman_prompts": 0}
    # uninterrupted reference (also builds the cached warm-up)
    ref_dir = tmp_path / "ref"
    res = subprocess.run(_cmd({**base, "output_dir": ref_dir}), cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd({**base, "output_dir": run_dir}), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        # kill after step 5: the last checkpoint (step 4) is behind the metrics file, which resume must truncate
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < steps

    res = subprocess.run(_cmd({**base, "output_dir": run_dir, "resume": True}), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step" in res.stderr
    assert _metrics(run_dir) == _metrics(ref_dir)
    ref_eval = [json.loads(l) for l in (ref_dir / "eval.jsonl").read_text().splitlines()]
    got_eval = [json.loads(l) for l in (run_dir / "eval.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_eval"} for r in rows]  # noqa: E731
    assert strip(got_eval) == strip(ref_eval)
