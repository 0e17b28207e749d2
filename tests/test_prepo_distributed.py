"""torchrun data parallelism on the CPU (gloo), 2 processes: one update on a fixed global batch
equals one process's update on it; a short run completes, and resumed it writes what an
uninterrupted run writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_harness import REPO, TINY, args as _args, env as _env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _torchrun(nproc: int, argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([*TORCHRUN, "--nproc_per_node", str(nproc), *map(str, argv)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.mark.slow
def test_two_process_update_equals_one_process(tmp_path, tiny_qwen2_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus 2?", "answer": str(a + 2)}) + "\n"
                            for a in range(8)))
    reward = tmp_path / "parity.py"
    reward.write_text("def score(prompts, completions, **columns):\n"
                      "    return [float(len(c) % 2) for c in completions]\n")
    cfg = {"model": str(tiny_qwen2_dir), "train_data": str(data), "reward": f"{reward}:score", "chat_template": True,
           "candidate_batch_size": 4, "select_ratio": 1.0, "group_size": 4, "max_new_tokens": 6, "mini_batches": 1,
           "lr": 1e-4, "output_dir": str(tmp_path / "o"), "progress": False, "tensorboard": False}
    out = {}
    for n in (1, 2):
        _torchrun(n, ["tests/dist_update_worker.py", json.dumps(cfg), tmp_path / f"{n}.pt"])
        out[n] = torch.load(tmp_path / f"{n}.pt", weights_only=False)
    assert out[1]["rewards"] == out[2]["rewards"]            # the same global batch
    assert out[1]["update"]["grad_norm"] > 0                 # the update moved the weights
    # AdamW's first step is lr * g / (|g| + eps): gradients within rounding of 0 (a few of them
    # here) may flip sign between the two reductions, moving those weights by up to 2 lr; a wrong
    # reduction would move many. grad_norm (compared below) checks the gradient's scale.
    for k, v in out[1]["params"].items():
        torch.testing.assert_close(out[2]["params"][k], v, rtol=1e-5, atol=2e-6, msg=k)
    for part in ("batch", "update"):
        assert out[2][part] == pytest.approx(out[1][part], rel=1e-5, abs=1e-6)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # rho is step / total_steps (random selection ignores it); evaluation and timings aside
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "eval_")) and k != "rho"} for r in rows]


@pytest.mark.slow
def test_torchrun_run_completes_and_resumes(tmp_path, tiny_cache_dir):
    base = {**TINY, "strategy": "random", "cache_dir": tiny_cache_dir, "tensorboard": False, "spearman_prompts": 0,
            "eval_every": 0, "save_every": 2}
    ref, run = tmp_path / "ref", tmp_path / "run"
    res = _torchrun(2, ["-m", "prepo.train", *_args({**base, "total_steps": 4, "output_dir": ref})])
    assert "4 steps" in res.stdout and res.stdout.count("strategy random") == 1   # rank 0 alone reports
    _torchrun(2, ["-m", "prepo.train", *_args({**base, "total_steps": 2, "output_dir": run})])
    res = _torchrun(2, ["-m", "prepo.train", *_args({**base, "total_steps": 4, "output_dir": run, "resume": True})])
    assert "resumed from step 2" in res.stderr
    got, want = _rows(run), _rows(ref)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert all(r["step_rollouts"] == 2 * 4 for r in got)    # K=2 prompts x G=4, counted over both ranks
    assert got == want
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rollouts"] == 32 and summary["resumed_from_step"] == 2


@pytest.mark.slow
def test_torchrun_refuses_dynamic_sampling(tmp_path):
    res = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "-m", "prepo.train", "--strategy", "dapo_dynamic",
                          "--output-dir", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "dapo_dynamic runs in one process only" in res.stderr
