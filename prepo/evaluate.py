"""Held-out evaluation: greedy accuracy (pass@1 with greedy decoding), optional avg@k (mean
accuracy over k samples per problem, the paper's metric), per-level accuracy, and the initial
diagnostic of PREPO's premise: Spearman correlation of prompt perplexity with pass rate.

Sampling here runs inside ``torch.random.fork_rng`` with a fixed seed, so evaluating never moves
the training RNG stream (a resumed run and an uninterrupted one stay identical).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .config import PPL_SCOPES
from .prompts import PromptEncoder, problem_text
from .rollout import RolloutEngine, roll_out
from .signals.premise import premise_stats, spearman
from .signals.scoring import prompt_perplexity

if TYPE_CHECKING:
    from .builder import RunParts

log = logging.getLogger("prepo")


def _accuracy(engine: RolloutEngine, reward_fn, problems, samples: int, greedy: bool) -> np.ndarray:
    """[len(problems)] share of ``samples`` completions per problem with reward > 0.5 (these
    rollouts are not training rollouts: nothing counts them)."""
    rewards = roll_out(engine, reward_fn, problems, samples, greedy=greedy).rewards.numpy()
    return (rewards > 0.5).astype(float).reshape(len(problems), samples).mean(axis=1)


@torch.no_grad()
def evaluate(engine, reward_fn, problems: Sequence, *, avg_k: int = 0, seed: int = 0) -> dict:
    """{'accuracy': greedy accuracy, 'accuracy_level<L>': ..., 'avg@k': ... when avg_k > 0}."""
    out: dict = {}
    greedy = _accuracy(engine, reward_fn, problems, 1, greedy=True)
    out["accuracy"] = float(greedy.mean())
    by_level = defaultdict(list)
    for p, a in zip(problems, greedy):
        if p.difficulty is not None:
            by_level[p.difficulty].append(a)
    for level in sorted(by_level):
        out[f"accuracy_level{level}"] = float(np.mean(by_level[level]))
    if avg_k > 0:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 12345)
            out[f"avg@{avg_k}"] = float(_accuracy(engine, reward_fn, problems, avg_k, greedy=False).mean())
    return out


def timed_evaluate(engine, reward_fn, problems: Sequence, *, avg_k: int = 0, seed: int = 0) -> dict:
    """:func:`evaluate`, with its wall time in seconds as ``time_eval``."""
    t0 = time.perf_counter()
    res = evaluate(engine, reward_fn, problems, avg_k=avg_k, seed=seed)
    res["time_eval"] = round(time.perf_counter() - t0, 6)
    return res


def initial_diagnostic(parts: "RunParts") -> dict:
    """Before training: the base model's build time and source, the data rows skipped,
    Spearman(prompt perplexity, pass rate) (``spearman_prompts`` > 0) and the step-0 evaluation
    (``eval``, when there is held-out data)."""
    cfg, data = parts.cfg, parts.data
    initial = {"warmup_seconds": parts.warmup_seconds, "base_model": str(parts.base_dir), "data": data.skipped}
    if cfg.spearman_prompts > 0:
        t0 = time.perf_counter()
        pool = data.spearman_pool(cfg)
        initial.update(ppl_pass_rate_spearman(
            parts.model, parts.engine, parts.reward_fn, pool, cfg.spearman_samples, seed=cfg.seed,
            impl=cfg.kernel_impl, max_tokens=cfg.max_tokens_per_microbatch, autocast=parts.precision.autocast))
        initial["time_spearman"] = time.perf_counter() - t0
        log.info("initial Spearman(prompt ppl, pass rate) = %.3f over %d prompts (pass-rate histogram %s)",
                 initial["spearman_ppl_passrate"], len(pool), initial["pass_rate_hist"])
    if data.eval:
        initial["eval"] = timed_evaluate(parts.engine, parts.reward_fn, data.eval, avg_k=cfg.eval_avg_k, seed=cfg.seed)
        log.info("initial held-out greedy accuracy %.3f", initial["eval"]["accuracy"])
    return initial


@torch.no_grad()
def ppl_pass_rate_spearman(model, engine, reward_fn, problems: Sequence, samples: int, *, seed: int = 0,
                           **score_opts) -> dict:
    """Spearman(prompt perplexity, pass rate over ``samples`` sampled completions) on ``problems``
    with the engine's prompt format, and per ``ppl_scope`` (``by_scope``: each scope the tokenizer
    can score, with the partial Spearman given log words of the problem); the pass rate per level.
    ``score_opts`` go to :func:`prompt_perplexity` (impl, max_tokens, autocast)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed + 54321)
        rate = _accuracy(engine, reward_fn, problems, samples, greedy=False)
    prompts = [p.prompt for p in problems]
    ppl = prompt_perplexity(model, engine.encoder, prompts, **score_opts).numpy()
    rho, pval = spearman(ppl, rate)
    words = [len(problem_text(p).split()) or 1 for p in prompts]
    fmt, tok = engine.encoder.fmt, engine.encoder.tokenizer
    by_scope = {}
    for scope in PPL_SCOPES if getattr(tok, "is_fast", False) else (fmt.ppl_scope,):
        enc = PromptEncoder(tok, dataclasses.replace(fmt, ppl_scope=scope))
        by_scope[scope] = premise_stats(prompt_perplexity(model, enc, prompts, **score_opts).numpy(), rate, words)
    levels = defaultdict(list)
    for p, r in zip(problems, rate):
        if p.difficulty is not None:
            levels[p.difficulty].append(float(r))
    return {
        "spearman_ppl_passrate": rho,
        "spearman_pvalue": pval,
        "ppl_scope": fmt.ppl_scope,
        "by_scope": by_scope,
        "n_prompts": len(problems),
        "samples": samples,
        "pass_rate_mean": float(rate.mean()),
        "pass_rate_hist": np.histogram(rate, bins=5, range=(0, 1))[0].tolist(),
        "pass_rate_by_level": {str(k): [round(float(np.mean(v)), 4), len(v)] for k, v in sorted(levels.items())},
    }
