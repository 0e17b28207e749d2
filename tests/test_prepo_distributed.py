"""torchrun data parallelism on the CPU (gloo), 2 processes: one update on a fixed global batch
equals one process's update on it (and skipping its zero-advantage rollouts changes nothing); a
short run completes, and resumed it writes what an uninterrupted run writes."""
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
def test_update_is_the_same_skipped_and_data_parallel(tmp_path, tiny_qwen2_dir):
    """One update on a fixed global batch, half of whose groups have all-equal rewards (advantage
    0): skipping those rollouts (the default) on one process and on two equals running them all on
    one process, up to float summation order. With one optimizer step per batch the skipping runs
    take the on-policy path (entropies and PREPO's weights from the update's forward, H_bar over
    both ranks); the reference runs the old-log-prob pass over every rollout."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus 2?", "answer": str(a + 2)}) + "\n"
                            for a in range(8)))
    reward = tmp_path / "parity.py"   # completion-length parity; 0 for the even prompts (a zero-variance group)
    reward.write_text("def score(prompts, completions, **columns):\n"
                      "    return [float(len(c) % 2) if int(p.split()[2]) % 2 else 0.0\n"
                      "            for p, c in zip(prompts, completions)]\n")
    cfg = {"model": str(tiny_qwen2_dir), "train_data": str(data), "reward": f"{reward}:score", "chat_template": True,
           "candidate_batch_size": 4, "select_ratio": 1.0, "group_size": 4, "max_new_tokens": 6, "mini_batches": 1,
           "lr": 1e-4, "output_dir": str(tmp_path / "o"), "progress": False, "tensorboard": False}
    out = {}
    for n, skip in ((1, 0), (1, 1), (2, 1)):
        _torchrun(n, ["tests/dist_update_worker.py", json.dumps(cfg), tmp_path / f"{n}{skip}.pt", skip])
        out[n, skip] = torch.load(tmp_path / f"{n}{skip}.pt", weights_only=False)
    ref = out[1, 0]
    assert ref["update"]["skipped_rollouts"] == 0 and ref["update"]["grad_norm"] > 0   # the update moved the weights
    assert ref["batch"]["zero_adv_frac"] >= 0.5                                          # groups of prompts 0 and 2
    for key in ((1, 1), (2, 1)):
        got = out[key]
        assert got["rewards"] == ref["rewards"]                                          # the same global batch
        assert got["update"]["skipped_rollouts"] == 4 * 4 * ref["batch"]["zero_adv_frac"]   # G x zero groups
        # AdamW's first step is lr * g / (|g| + eps): gradients within rounding of 0 may flip sign
        # between two summation orders, moving those weights by up to 2 lr; a wrong update would
        # move many. The gradients (after clipping) and grad_norm check the gradient itself.
        for k, v in ref["params"].items():
            torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=2e-6, msg=k)
            torch.testing.assert_close(got["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-7, msg=k)
        assert got["batch"] == pytest.approx(ref["batch"], rel=1e-5, abs=1e-6)
        same = {k: v for k, v in got["update"].items() if k not in ("skipped_rollouts", "ratio_mean")}
        assert same == pytest.approx({k: ref["update"][k] for k in same}, rel=1e-5, abs=1e-6)


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
