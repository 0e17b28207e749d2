"""PREPO trainer: ``python -m prepo.train [--config file.yaml] [--key value ...]``.

PREPO (arXiv 2511.00794) spends rollouts where they teach most, using two signals the policy
already has: prompt perplexity (selection) and rollout entropy (weighting). Each step:

  1. draw a candidate batch B of prompts and score each prompt's perplexity under the CURRENT
     policy: exp(-mean log-prob of the prompt tokens), one no-grad forward (fused kernel, no
     logits held);
  2. sort ascending and select the window of K = ratio * |B| prompts starting at
     l = floor(rho * (|B| - K)), rho = step / total_steps (linear pacing): familiar prompts
     first, harder ones later. Only the selected prompts are rolled out;
  3. roll out G completions per selected prompt and reward them (answer checking);
  4. one no-grad pass for the old log-probs and the full-vocabulary token entropies; weight each
     rollout by w_i = H_i / H_bar (its mean token entropy over the token-weighted batch mean),
     detached;
  5. DAPO-style GRPO update: group-normalized advantages, clipped surrogate with clip-higher
     (eps_low 0.2, eps_high 0.28), token-mean aggregation, each rollout's surrogate times w_i,
     optional k3 KL to a frozen reference, several optimizer steps (mini-batches x ppo epochs).

``--strategy`` swaps the selection/weighting for the baselines: random (uniform K of B),
ppl_only (curriculum, no weighting), entropy_only (random + weighting), static_low_ppl (always
the K lowest-perplexity prompts), dapo_dynamic (over-sample, drop groups with all-equal rewards,
refill; every generated rollout counts).

Without arguments it runs the built-in task (integer arithmetic, graded difficulty) on a tiny
Qwen2 warmed up by :mod:`prepo.model`, in a few minutes on a CPU. From Python:
``prepo.train.run(TrainConfig(...) or dict) -> summary dict``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import yaml

import prepo_kernels

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, from_dict, parse_args
from .curriculum import PromptSampler, Strategy, get_strategy, pacing_rho
from .evaluate import evaluate, ppl_pass_rate_spearman
from .loss import grpo_loss, group_advantages
from .model import WarmupConfig, get_base_model_dir, load_policy
from .rewards import compute_rewards, reward_fn as default_reward_fn
from .rollout import HFGenerateEngine, Rollouts
from .scoring import prompt_perplexity
from .task import DataError, Problem, balanced_problems, generate_problems, load_problems_jsonl
from .weighting import relative_entropy_weights

log = logging.getLogger("prepo")
TIME_KEYS = ("time_score", "time_generate", "time_reward", "time_old_logprob", "time_weight", "time_update")


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {k: 0.0 for k in TIME_KEYS}

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of ``path`` (what a checkpoint had seen), drop the rest."""
    if not path.exists():
        if n:
            raise RuntimeError(f"{path} is missing but the checkpoint expects {n} lines in it")
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) < n:
        raise RuntimeError(f"{path} has {len(lines)} lines, the checkpoint expects {n}")
    path.write_text("".join(lines[:n]))


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _append_jsonl(path: Path, obj: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def load_data(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    if cfg.train_file:
        train = load_problems_jsonl(cfg.train_file)
    else:
        train = generate_problems(cfg.train_size, cfg.seed, "train", heldout_frac=cfg.heldout_frac)
    if cfg.eval_file:
        evals = load_problems_jsonl(cfg.eval_file)
    else:
        evals = balanced_problems(cfg.eval_per_level, cfg.seed, "eval", heldout_frac=cfg.heldout_frac)
    overlap = {p.prompt for p in train} & {p.prompt for p in evals}
    if overlap:
        raise DataError(f"{len(overlap)} held-out prompts also appear in training, e.g. {sorted(overlap)[:3]}")
    return train, evals


def warmup_config(cfg: TrainConfig) -> WarmupConfig:
    return WarmupConfig(
        seed=0, hidden_size=cfg.warmup_hidden_size, num_layers=cfg.warmup_layers,
        steps=cfg.warmup_steps, batch_size=cfg.warmup_batch_size,
        heldout_frac=cfg.heldout_frac, slip_rate=cfg.warmup_slip_rate,
    )


class Trainer:
    """Holds the run's state; :meth:`step` is one PREPO iteration, :meth:`fit` the whole run."""

    def __init__(self, cfg: TrainConfig, reward_fn: Optional[Callable] = None):
        self.cfg = cfg
        self.reward_fn = reward_fn or default_reward_fn
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.eval_path = self.out / "eval.jsonl"
        self.strategy: Strategy = get_strategy(cfg.strategy)
        self.K = cfg.num_selected
        torch.set_num_threads(cfg.num_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.train_problems, self.eval_problems = load_data(cfg)
        t0 = time.perf_counter()
        if cfg.model_dir:
            self.base_dir, built = Path(cfg.model_dir), False
        else:
            self.base_dir, built = get_base_model_dir(
                warmup_config(cfg), Path(cfg.cache_dir) if cfg.cache_dir else None, progress=True)
        self.warmup_seconds = time.perf_counter() - t0 if built else 0.0
        if built:
            log.info("warm-up model built in %.1fs -> %s", self.warmup_seconds, self.base_dir)
        self.model, self.tokenizer = load_policy(self.base_dir)
        # dropout stays off for the whole run (eval mode), as in TRL's GRPO: rollouts, old log-probs
        # and the update then see the same function, and the ratio is exactly 1 before any step
        self.model.eval()
        self.ref_model = None
        if cfg.kl_beta > 0:
            self.ref_model, _ = load_policy(self.base_dir)
            self.ref_model.eval().requires_grad_(False)
        self.engine = HFGenerateEngine(self.model, self.tokenizer, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.99))
        self.sampler = PromptSampler(len(self.train_problems), cfg.seed)
        self.select_rng = np.random.default_rng([cfg.seed, 31337])
        self.step_idx = 0
        self.reward_failures = 0
        self.initial: dict = {}
        self.tb = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step_idx,
            "rollouts": self.engine.rollouts_generated,
            "reward_failures": self.reward_failures,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "select_rng": self.select_rng.bit_generator.state,
            "rng": ckpt.rng_state(),
            "metrics_lines": _count_lines(self.metrics_path),
            "eval_lines": _count_lines(self.eval_path),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_idx = state["step"]
        self.engine.rollouts_generated = state["rollouts"]
        self.reward_failures = state["reward_failures"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.select_rng.bit_generator.state = state["select_rng"]
        ckpt.set_rng_state(state["rng"])
        _truncate_lines(self.metrics_path, state["metrics_lines"])
        _truncate_lines(self.eval_path, state["eval_lines"])

    def save(self) -> None:
        ckpt.save_checkpoint(self.ckpt_dir, self.state_dict())

    # ------------------------------------------------------------------ pieces of a step
    def rollout_and_reward(self, problems: Sequence[Problem], timer: Timer) -> tuple[Rollouts, torch.Tensor, int]:
        """G completions per problem (every one counted by the engine), their rewards [N] and the
        number of reward calls that raised (those items get 0)."""
        with timer("time_generate"):
            chunks = list(self.engine.generate([p.prompt for p in problems], self.cfg.group_size))
            ro = Rollouts.concat(chunks, self.tokenizer.pad_token_id)
        with timer("time_reward"):
            rows = [problems[i] for i in ro.prompt_index]
            rewards, failures = compute_rewards(
                self.reward_fn, [p.prompt for p in rows], ro.completions,
                answer=[p.answer for p in rows], difficulty=[p.difficulty for p in rows])
        return ro, torch.tensor(rewards, dtype=torch.float32), failures

    def collect_dynamic(self, cand: list[int], order: list[int], timer: Timer):
        """DAPO dynamic sampling: roll out candidates in ``order`` K at a time, keep the groups whose
        rewards are not all equal, refill from fresh candidate batches until K groups are kept or
        ``dynamic_max_rounds`` candidate batches are spent. Every generated rollout is counted."""
        G, K = self.cfg.group_size, self.K
        kept_ro: list[Rollouts] = []
        kept_r: list[torch.Tensor] = []
        kept_problems: list[Problem] = []
        rounds, pos, failures, generated_groups = 1, 0, 0, 0
        while len(kept_problems) < K:
            if pos >= len(order):
                if rounds >= self.cfg.dynamic_max_rounds:
                    break
                rounds += 1
                cand = self.sampler.next_batch(self.cfg.candidate_batch_size)
                order = self.select_rng.permutation(len(cand)).tolist()
                pos = 0
            take = order[pos : pos + K - len(kept_problems)]
            pos += len(take)
            problems = [self.train_problems[cand[i]] for i in take]
            ro, r, f = self.rollout_and_reward(problems, timer)
            failures += f
            generated_groups += len(problems)
            r = r.view(-1, G)
            keep = [g for g in range(len(problems)) if bool((r[g] != r[g, 0]).any())]
            if keep:
                rows_keep = [g * G + j for g in keep for j in range(G)]
                kept_ro.append(ro.select(rows_keep))
                kept_r.append(r[keep].reshape(-1))
                kept_problems += [problems[g] for g in keep]
        extra = {"dynamic_rounds": rounds, "dynamic_groups_generated": generated_groups,
                 "dynamic_groups_kept": len(kept_problems)}
        if not kept_problems:
            return None, None, failures, kept_problems, extra
        return (Rollouts.concat(kept_ro, self.tokenizer.pad_token_id), torch.cat(kept_r), failures,
                kept_problems, extra)

    def update(self, ro: Rollouts, adv: torch.Tensor, weights: Optional[torch.Tensor], old_lp: torch.Tensor,
               ref_lp: Optional[torch.Tensor]) -> dict:
        cfg = self.cfg
        ids, amask, sl = ro.full_sequences()
        cmask = ro.completion_mask
        n = ids.shape[0]
        losses, clips, kls, ratios, gnorms = [], [], [], [], []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n)
            for mb in torch.tensor_split(perm, min(cfg.mini_batches, n)):
                if mb.numel() == 0:
                    continue
                lp, _ = prepo_kernels.causal_lm_logprob_entropy(
                    self.model, ids[mb], amask[mb], temperature=cfg.temperature, compute_entropy=False,
                    impl=cfg.kernel_impl)
                out = grpo_loss(
                    lp[:, sl], old_lp[mb], adv[mb], cmask[mb], None if weights is None else weights[mb],
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    ref_logprob=None if ref_lp is None else ref_lp[mb], kl_beta=cfg.kl_beta)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                losses.append(out.loss.item())
                clips.append(out.clip_frac)
                kls.append(out.kl)
                ratios.append(out.ratio_mean)
                gnorms.append(float(gnorm))
        return {"loss": float(np.mean(losses)), "clip_frac": float(np.mean(clips)), "kl": float(np.mean(kls)),
                "ratio_mean": float(np.mean(ratios)), "grad_norm": float(np.mean(gnorms))}

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        cfg, G, K = self.cfg, self.cfg.group_size, self.K
        timer = Timer()
        t_step = time.perf_counter()
        rollouts_before = self.engine.rollouts_generated
        m: dict = {"step": self.step_idx + 1}

        # 1. candidate batch, scored by prompt perplexity under the current policy
        cand = self.sampler.next_batch(cfg.candidate_batch_size)
        ppl = None
        if self.strategy.needs_ppl:
            with timer("time_score"):
                ppl = prompt_perplexity(self.model, self.tokenizer, [self.train_problems[i].prompt for i in cand],
                                        impl=cfg.kernel_impl, encoder=self.engine.encoder).numpy()

        # 2. select: the perplexity window at rho (or a baseline's choice)
        rho = pacing_rho(self.step_idx, cfg.total_steps, cfg.pacing)
        with timer("time_score"):
            order = self.strategy.select(ppl, len(cand), K, rho, self.select_rng)

        # 3. roll out G completions per selected prompt and reward them
        extra: dict = {}
        if self.strategy.dynamic:
            ro, rewards, failures, selected, extra = self.collect_dynamic(cand, order, timer)
        else:
            selected = [self.train_problems[cand[i]] for i in order]
            ro, rewards, failures = self.rollout_and_reward(selected, timer)
        self.reward_failures += failures
        if failures:
            log.warning("step %d: %d reward(s) could not be computed and count as 0 (%d so far)",
                        self.step_idx + 1, failures, self.reward_failures)

        if ro is not None:
            # 4. old log-probs and full-vocabulary entropies (one no-grad pass), relative-entropy weights
            ids, amask, sl = ro.full_sequences()
            cmask = ro.completion_mask
            with timer("time_old_logprob"), torch.no_grad():
                old_lp, ent = prepo_kernels.causal_lm_logprob_entropy(
                    self.model, ids, amask, temperature=cfg.temperature, compute_entropy=True, impl=cfg.kernel_impl)
                old_lp, ent = old_lp[:, sl], ent[:, sl]
                ref_lp = None
                if self.ref_model is not None:
                    ref_lp, _ = prepo_kernels.causal_lm_logprob_entropy(
                        self.ref_model, ids, amask, temperature=cfg.temperature, compute_entropy=False,
                        impl=cfg.kernel_impl)
                    ref_lp = ref_lp[:, sl]
            with timer("time_weight"):
                w = relative_entropy_weights(ent, cmask)
                weights = w if self.strategy.weighting else None
            adv = group_advantages(rewards, G, cfg.adv_eps)

            # 5. DAPO-style GRPO update
            with timer("time_update"):
                upd = self.update(ro, adv, weights, old_lp, ref_lp)

            groups = rewards.view(-1, G)
            n_tok = cmask.sum().item()
            m.update({
                "reward_mean": float(rewards.mean()),
                "zero_adv_frac": float((groups.std(dim=1) == 0).float().mean()),
                "entropy_mean": float((ent * cmask).sum() / max(n_tok, 1)),
                "weight_min": float(w.min()), "weight_max": float(w.max()),
                "weight_p10": float(w.quantile(0.1)), "weight_p90": float(w.quantile(0.9)),
                "weight_applied": self.strategy.weighting,
                "completion_len": n_tok / cmask.shape[0],
                **upd,
            })
        else:
            m.update({"reward_mean": 0.0, "zero_adv_frac": 1.0, "entropy_mean": 0.0, "weight_min": 1.0,
                      "weight_max": 1.0, "weight_p10": 1.0, "weight_p90": 1.0, "weight_applied": self.strategy.weighting, "completion_len": 0.0,
                      "loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio_mean": 1.0, "grad_norm": 0.0})

        sel_ppl = None
        if ppl is not None:
            sel_ppl = ppl[order[:K]] if not self.strategy.dynamic else None
        levels = [p.difficulty for p in selected]
        m.update({
            "rollouts": self.engine.rollouts_generated,
            "step_rollouts": self.engine.rollouts_generated - rollouts_before,
            "rho": rho,
            "ppl_window_lo": float(sel_ppl.min()) if sel_ppl is not None else None,
            "ppl_window_hi": float(sel_ppl.max()) if sel_ppl is not None else None,
            "ppl_batch_mean": float(ppl.mean()) if ppl is not None else None,
            "selected_difficulty": float(np.mean(levels)) if levels else None,
            "reward_failures": self.reward_failures,
            **extra,
        })
        m.update({k: round(v, 6) for k, v in timer.t.items()})
        m["time_step"] = round(time.perf_counter() - t_step, 6)
        m["time_prepo_overhead_frac"] = round((timer.t["time_score"] + timer.t["time_weight"]) / m["time_step"], 6)
        self.step_idx += 1
        return m

    # ------------------------------------------------------------------ evaluation
    def run_eval(self) -> dict:
        t0 = time.perf_counter()
        res = evaluate(self.engine, self.reward_fn, self.eval_problems, avg_k=self.cfg.eval_avg_k, seed=self.cfg.seed)
        res["time_eval"] = round(time.perf_counter() - t0, 6)
        return res

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        initial_path = self.out / "initial.json"
        resumed_from = None
        state = ckpt.load_checkpoint(self.ckpt_dir) if cfg.resume else None
        if cfg.resume and state is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
        if state is not None:
            self.load_state_dict(state)
            resumed_from = self.step_idx
            self.initial = json.loads(initial_path.read_text())
            log.info("resumed from step %d (%d rollouts)", self.step_idx, self.engine.rollouts_generated)
        else:
            for p in (self.metrics_path, self.eval_path):
                if p.exists():
                    p.unlink()
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.initial = {"warmup_seconds": self.warmup_seconds, "base_model": str(self.base_dir)}
            if cfg.spearman_prompts > 0:
                t0 = time.perf_counter()
                pool = generate_problems(cfg.spearman_prompts, cfg.seed + 777, "train", heldout_frac=cfg.heldout_frac) \
                    if not cfg.train_file else self.train_problems[: cfg.spearman_prompts]
                self.initial.update(ppl_pass_rate_spearman(
                    self.model, self.tokenizer, self.engine, self.reward_fn, pool, cfg.spearman_samples,
                    seed=cfg.seed, impl=cfg.kernel_impl))
                self.initial["time_spearman"] = time.perf_counter() - t0
                log.info("initial Spearman(prompt ppl, pass rate) = %.3f over %d prompts (pass-rate histogram %s)",
                         self.initial["spearman_ppl_passrate"], len(pool), self.initial["pass_rate_hist"])
            ev = self.run_eval()
            self.initial["eval"] = ev
            _append_jsonl(self.eval_path, {"step": 0, "rollouts": 0, **ev})
            initial_path.write_text(json.dumps(self.initial, indent=1))
            log.info("initial held-out greedy accuracy %.3f", ev["accuracy"])

        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=self.step_idx + 1 if resumed_from else None)
            except ImportError:
                self.tb = None

        last_eval = self.initial.get("eval", {}).get("accuracy")
        if self.eval_path.exists():
            lines = self.eval_path.read_text().splitlines()
            if lines:
                last_eval = json.loads(lines[-1])["accuracy"]
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.total_steps, initial=self.step_idx, desc=f"prepo[{cfg.strategy}]",
                       dynamic_ncols=True, file=sys.stderr)
        while self.step_idx < cfg.total_steps:
            m = self.step()
            s = m["step"]
            if (cfg.eval_every and s % cfg.eval_every == 0) or s == cfg.total_steps:
                ev = self.run_eval()
                m["eval_accuracy"] = ev["accuracy"]
                m["time_eval"] = ev["time_eval"]
                if f"avg@{cfg.eval_avg_k}" in ev:
                    m[f"eval_avg@{cfg.eval_avg_k}"] = ev[f"avg@{cfg.eval_avg_k}"]
                _append_jsonl(self.eval_path, {"step": s, "rollouts": m["rollouts"], **ev})
                last_eval = ev["accuracy"]
            _append_jsonl(self.metrics_path, m)
            if self.tb is not None:
                for k, v in m.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                        self.tb.add_scalar(k, v, s)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rollouts=m["rollouts"], reward=f"{m['reward_mean']:.2f}",
                                acc="-" if last_eval is None else f"{last_eval:.3f}")
            if (cfg.save_every and s % cfg.save_every == 0) or s == cfg.total_steps:
                self.save()
        if bar is not None:
            bar.close()
        if self.tb is not None:
            self.tb.close()
        return self.finish(time.perf_counter() - t_start, resumed_from)

    def finish(self, seconds: float, resumed_from: Optional[int]) -> dict:
        metrics = [json.loads(l) for l in self.metrics_path.read_text().splitlines()] if self.metrics_path.exists() else []
        evals = [json.loads(l) for l in self.eval_path.read_text().splitlines()] if self.eval_path.exists() else []
        split = {k: float(sum(m.get(k, 0.0) for m in metrics)) for k in TIME_KEYS + ("time_step",)}
        step_total = split["time_step"] or 1.0
        plot_path = plot_curve(evals, self.out / "accuracy_vs_rollouts.png", self.cfg.strategy)
        summary = {
            "strategy": self.cfg.strategy,
            "seed": self.cfg.seed,
            "steps": self.step_idx,
            "rollouts": self.engine.rollouts_generated,
            "initial_accuracy": evals[0]["accuracy"] if evals else None,
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "curve": [(e["rollouts"], e["accuracy"]) for e in evals],
            "avg_k": self.cfg.eval_avg_k,
            "initial_avg_k": evals[0].get(f"avg@{self.cfg.eval_avg_k}") if evals else None,
            "final_avg_k": evals[-1].get(f"avg@{self.cfg.eval_avg_k}") if evals else None,
            "spearman_ppl_passrate": self.initial.get("spearman_ppl_passrate"),
            "reward_failures": self.reward_failures,
            "time_split_seconds": split,
            "time_split_frac": {k: split[k] / step_total for k in TIME_KEYS},
            "prepo_overhead_frac": (split["time_score"] + split["time_weight"]) / step_total,
            "train_seconds_this_process": seconds,
            "warmup_seconds": self.initial.get("warmup_seconds", 0.0),
            "resumed_from_step": resumed_from,
            "output_dir": str(self.out),
            "metrics": str(self.metrics_path),
            "plot": str(plot_path) if plot_path else None,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def plot_curve(evals: list[dict], path: Path, label: str) -> Optional[Path]:
    if not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [e["rollouts"] for e in evals]
    ax.plot(xs, [e["accuracy"] for e in evals], marker="o", label=f"{label}: greedy")
    avg_keys = sorted({k for e in evals for k in e if k.startswith("avg@")})
    for k in avg_keys:
        pts = [(e["rollouts"], e[k]) for e in evals if k in e]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", label=f"{label}: {k}")
    ax.set_xlabel("cumulative rollouts")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(config: TrainConfig | dict | None = None, *, reward_fn: Optional[Callable] = None) -> dict:
    """Run (or resume) training; returns the summary dict (also written to output_dir/summary.json)."""
    if config is None:
        cfg = TrainConfig().validate()
    elif isinstance(config, dict):
        cfg = from_dict(config)
    else:
        cfg = config.validate()
    return Trainer(cfg, reward_fn=reward_fn).fit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars
    except ImportError:
        pass
    t0 = time.perf_counter()
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        summary = run(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    fr = summary["time_split_frac"]
    print(f"strategy {summary['strategy']}, {summary['steps']} steps, {summary['rollouts']} rollouts, wall {wall:.0f}s")
    if summary["spearman_ppl_passrate"] is not None:
        print(f"Spearman(prompt perplexity, pass rate) of the base policy: {summary['spearman_ppl_passrate']:.3f}")
    print(f"held-out greedy accuracy: initial {summary['initial_accuracy']:.3f} -> final {summary['final_accuracy']:.3f}")
    if summary["initial_avg_k"] is not None:
        print(f"held-out avg@{summary['avg_k']} (sampled): initial {summary['initial_avg_k']:.3f} -> final {summary['final_avg_k']:.3f}")
    print("step time split: " + ", ".join(f"{k[5:]} {100 * v:.1f}%" for k, v in fr.items())
          + f"; PREPO overhead (scoring + weighting) {100 * summary['prepo_overhead_frac']:.2f}%")
    print(f"results in {summary['output_dir']} (metrics.jsonl, eval.jsonl, summary.json, {Path(summary['plot']).name if summary['plot'] else 'no plot'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
