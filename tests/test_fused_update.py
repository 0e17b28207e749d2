"""The trainer's update with the fused GRPO loss (prepo_kernels.linear_grpo_loss) against the
fallback (the fused log-probs through prepo.loss.grpo_loss): a short default-config run gives the
same parameters and the same logged metrics either way, and a KL term takes the fallback."""
from __future__ import annotations

import pytest
import torch

from prepo import checkpoint as ckpt
from prepo.learner import Learner
from prepo.train import run
from trainer_harness import TINY, metrics


def parity(prompts, completions, **columns):
    """Completion-length parity for about half of the prompts, 0 for the others: groups of both
    kinds, zero-advantage ones (skipped) and ones with reward variance (updated)."""
    return [float(len(c) % 2) if sum(map(ord, str(p))) % 2 else 0.0 for p, c in zip(prompts, completions)]


def _run(tmp_path, tiny_cache_dir, name, monkeypatch, *, fused: bool, **overrides):
    """A 3-step default-config run; (its metrics rows, its final parameters, the micro-batches whose
    loss was the fused one, those whose loss was the fallback's)."""
    calls = {"fused": 0, "fallback": 0}
    for kind, method in (("fused", "_fused_chunk_loss"), ("fallback", "_chunk_loss")):
        orig = getattr(Learner, method)

        def spy(self, *a, _orig=orig, _kind=kind, **k):
            calls[_kind] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(Learner, method, spy)
    if not fused:   # a learner that never takes the fused loss
        monkeypatch.setattr(Learner, "fused_loss_applies", lambda self, weights, live: False)
    out = tmp_path / name
    run({**TINY, "total_steps": 3, "output_dir": str(out), "cache_dir": str(tiny_cache_dir), "spearman_prompts": 0,
         "eval_every": 0, "tensorboard": False, "lr": 1e-4, **overrides}, reward_fn=parity)
    monkeypatch.undo()
    params = ckpt.load_checkpoint(out / "checkpoints")["model"]
    return metrics(out), params, calls


@pytest.mark.slow
def test_fused_loss_run_matches_the_fallback(tmp_path, tiny_cache_dir, monkeypatch):
    got, got_params, got_calls = _run(tmp_path, tiny_cache_dir, "fused", monkeypatch, fused=True)
    ref, ref_params, ref_calls = _run(tmp_path, tiny_cache_dir, "fallback", monkeypatch, fused=False)
    assert got_calls["fused"] > 0 and got_calls["fallback"] == 0   # the default run takes the fused loss
    assert ref_calls["fused"] == 0 and ref_calls["fallback"] > 0
    assert sum(0 < r["skipped_rollouts"] for r in ref) > 0                    # zero-advantage rollouts ...
    assert sum(r["skipped_rollouts"] < r["step_rollouts"] for r in ref) > 0   # ... and updated ones
    assert [r.keys() for r in got] == [r.keys() for r in ref]
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, rel=1e-5, abs=1e-6)
    # AdamW's steps are lr * m / (sqrt(v) + eps): a gradient within rounding of 0 may flip sign
    # between the two summation orders, moving that weight by up to 2 lr per step
    for k, v in ref_params.items():
        torch.testing.assert_close(got_params[k], v, rtol=1e-5, atol=6e-4, msg=k)


@pytest.mark.slow
def test_kl_term_takes_the_fallback(tmp_path, tiny_cache_dir, monkeypatch):
    rows, _, calls = _run(tmp_path, tiny_cache_dir, "kl", monkeypatch, fused=True, kl_beta=0.05, total_steps=1)
    assert calls["fused"] == 0 and calls["fallback"] > 0 and rows[0]["kl"] >= 0
