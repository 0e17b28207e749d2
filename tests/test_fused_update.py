"""The trainer's update, whose loss is prepo_kernels.linear_grpo_loss on the decoder's hidden states
(one path), against the same run with the loss computed the plain way (the fused log-probs through
prepo.loss.grpo_loss, defined here): a short default-config run, and one with a KL term, give the
same parameters and the same logged metrics either way. With one optimizer step per batch (on-policy)
the update's own forward gives the entropies and PREPO's weights: the same run as with the
old-log-prob pass."""
from __future__ import annotations

import pytest
import torch

import prepo_kernels
from prepo import checkpoint as ckpt
from prepo.learner import Learner
from prepo.loss import grpo_loss
from prepo.train import run
from trainer_harness import TINY, metrics


def parity(prompts, completions, **columns):
    """Completion-length parity for about half of the prompts, 0 for the others: groups of both
    kinds, zero-advantage ones (skipped) and ones with reward variance (updated)."""
    return [float(len(c) % 2) if sum(map(ord, str(p))) % 2 else 0.0 for p, c in zip(prompts, completions)]


def plain_chunk_loss(self, seqs, chunk, adv, weights, old, n_tok):
    """Learner._chunk_loss the plain way: [loss, clip_frac, kl, ratio sum] from the fused log-probs."""
    cfg, dev = self.cfg, self.device
    ids, amask, cmask, sl = seqs
    lp, _ = self._logprob(self.model, ids, amask, chunk, entropy=False)
    out = grpo_loss(
        lp[:, sl], old.logprob[chunk].to(dev), adv[chunk].to(dev), cmask[chunk].to(dev),
        None if weights is None else weights[chunk].to(dev), eps_low=cfg.eps_low, eps_high=cfg.eps_high,
        ref_logprob=None if old.ref_logprob is None else old.ref_logprob[chunk].to(dev), kl_beta=cfg.kl_beta,
        num_tokens=n_tok)
    return [out.loss, out.clip_frac, out.kl, out.ratio_mean]


def _run(tmp_path, tiny_cache_dir, name, monkeypatch, *, plain: bool = False, **overrides):
    """A 3-step default-config run; (its metrics rows, its final parameters, the calls of linear_grpo_loss)."""
    calls = []
    real = prepo_kernels.hf.linear_grpo_loss
    monkeypatch.setattr(prepo_kernels.hf, "linear_grpo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    if plain:
        monkeypatch.setattr(Learner, "_chunk_loss", plain_chunk_loss)
        monkeypatch.setattr(Learner, "on_policy", False)
    out = tmp_path / name
    run({**TINY, "total_steps": 3, "output_dir": str(out), "cache_dir": str(tiny_cache_dir), "spearman_prompts": 0,
         "eval_every": 0, "tensorboard": False, "lr": 1e-4, **overrides}, reward_fn=parity)
    monkeypatch.undo()
    params = ckpt.load_checkpoint(out / "checkpoints")["model"]
    return metrics(out), params, len(calls)


@pytest.mark.slow
@pytest.mark.parametrize("kl_beta", [0.0, 0.05])
def test_fused_loss_run_matches_the_plain_loss(tmp_path, tiny_cache_dir, monkeypatch, kl_beta):
    got, got_params, got_calls = _run(tmp_path, tiny_cache_dir, "fused", monkeypatch, plain=False, kl_beta=kl_beta)
    ref, ref_params, ref_calls = _run(tmp_path, tiny_cache_dir, "plain", monkeypatch, plain=True, kl_beta=kl_beta)
    assert got_calls > 0 and ref_calls == 0   # the update's loss is the fused op
    if kl_beta == 0:
        assert sum(0 < r["skipped_rollouts"] for r in ref) > 0                    # zero-advantage rollouts ...
        assert sum(r["skipped_rollouts"] < r["step_rollouts"] for r in ref) > 0   # ... and updated ones
    else:
        assert all(r["kl"] >= 0 for r in got) and any(r["kl"] > 0 for r in got)
    assert_same_run(got, got_params, ref, ref_params)


def assert_same_run(got, got_params, ref, ref_params):
    """The same logged metrics (``metrics`` leaves the timings out) and the same final parameters."""
    assert [r.keys() for r in got] == [r.keys() for r in ref]
    for g, r in zip(got, ref):   # None: a metric not computed at that step (in both runs)
        assert [k for k in g if g[k] is None] == [k for k in r if r[k] is None]
        assert ({k: v for k, v in g.items() if v is not None}
                == pytest.approx({k: v for k, v in r.items() if v is not None}, rel=1e-5, abs=1e-6))
    # AdamW's steps are lr * m / (sqrt(v) + eps): a gradient within rounding of 0 may flip sign
    # between the two summation orders, moving that weight by up to 2 lr per step
    for k, v in ref_params.items():
        torch.testing.assert_close(got_params[k], v, rtol=1e-5, atol=6e-4, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["prepo", "random"])
def test_on_policy_update_matches_the_old_logprob_pass(tmp_path, tiny_cache_dir, monkeypatch, strategy):
    """mini_batches 1: the update's forward gives the entropies (and, for prepo, the weights, applied
    as H_i in the loss and 1 / H_bar on the gradient); the old-log-prob pass then runs only on the
    rollouts the update skips. Same run as with the pass over every rollout and w_i in the loss."""
    passed = []
    real = Learner.logprobs_and_entropies

    def counted(self, ro, rows=None):
        passed.append((ro.completion_mask.shape[0], None if rows is None else rows.numel()))
        return real(self, ro, rows)

    monkeypatch.setattr(Learner, "logprobs_and_entropies", counted)
    over = dict(mini_batches=1, strategy=strategy, candidate_batch_size=20)
    got, got_params, _ = _run(tmp_path, tiny_cache_dir, "on_policy", monkeypatch, **over)
    monkeypatch.setattr(Learner, "logprobs_and_entropies", counted)
    monkeypatch.setattr(Learner, "on_policy", False)
    n_on = len(passed)
    ref, ref_params, _ = _run(tmp_path, tiny_cache_dir, "two_pass", monkeypatch, **over)
    on, two = passed[:n_on], passed[n_on:]
    assert all(rows is None for _, rows in two)
    assert all(rows is not None for _, rows in on), on
    assert any(0 < rows < n for n, rows in on), on   # a step with rows skipped and rows updated
    assert [r["skipped_rollouts"] for r in got] == [rows for _, rows in on]
    if strategy == "prepo":   # weights that differ (by 0.3-1% here: the logged loss tells them from 1 at rel 1e-5)
        assert all(r["weight_max"] - r["weight_min"] > 1e-3 for r in got)
    assert_same_run(got, got_params, ref, ref_params)
