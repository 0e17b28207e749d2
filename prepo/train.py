"""PREPO trainer: ``python -m prepo.train [--config file.yaml] [--key value ...]`` (CLI in
:mod:`prepo.cli`); from Python, ``prepo.train.run(TrainConfig(...) or dict) -> summary dict``.

PREPO (arXiv 2511.00794) spends rollouts where they teach most, using two signals the policy
already has: prompt perplexity (selection) and rollout entropy (weighting). Each step:

  1. select: draw a candidate batch B, score each prompt's perplexity under the CURRENT policy
     (one no-grad fused-kernel forward), sort ascending and take the window of K = ratio * |B|
     prompts at l = floor(rho * (|B| - K)), rho = step / total_steps;
  2. roll out G completions per selected prompt (HF generate or vLLM);
  3. reward them (the task's checker, math_reward or the user's function);
  4. score/weight: one no-grad pass for the old log-probs and full-vocabulary entropies, and
     w_i = H_i / H_bar per rollout (detached); with one optimizer step per batch and no KL term
     the old log-probs are the current ones and the update's own forward gives the entropies;
  5. update: DAPO-style GRPO (group-normalized advantages, clip-higher, token-mean, each rollout's
     surrogate times w_i), micro-batched by a token budget, zero-advantage rollouts skipped when
     there is no KL term; the rollout engine gets the new weights;
  6. log one :class:`~prepo.metrics.StepMetrics`.

The run's setup is :func:`prepo.builder.build_run`; steps 4 and 5 are the learner's
(:mod:`prepo.learner`); the run's counters and step record are in :mod:`prepo.metrics`. The
parts sit behind small interfaces: the data source (:mod:`prepo.sources`) and the reward
(:func:`prepo.rewards.load_reward_fn`), the policy loader (:mod:`prepo.policy`), the rollout engine
and the one roll-out-and-reward path (:mod:`prepo.rollout`, vLLM in :mod:`prepo.vllm_engine`), the
selection strategy (:mod:`prepo.signals.strategies`, which says what it needs) and the collectors
(:mod:`prepo.collect`; DAPO dynamic sampling is its own), the metrics record
(:mod:`prepo.metrics`), and the run's outputs (:mod:`prepo.report`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .builder import build_run
from .cli import main as cli_main
from .collect import Collected, collect_dynamic, collect_static
from .config import TrainConfig, from_dict
from .errors import RunDirError
from .evaluate import initial_diagnostic, timed_evaluate
from .loss import group_advantages
from .metrics import BatchStats, RunCounters, StepMetrics, Timer, UpdateStats, batch_stats, step_times
from .report import count_lines, selection_row, write_summary
from .rollout import roll_out
from .runlock import run_lock
from .signals.pacing import pacing_rho
from .signals.premise import Premise, PremiseParams
from .signals.scoring import prompt_perplexity

log = logging.getLogger("prepo")


class Trainer:
    """Runs the parts :func:`~prepo.builder.build_run` sets up: :meth:`step` is one PREPO
    iteration, :meth:`fit` the whole run (with its checkpoints and evaluations)."""

    def __init__(self, cfg: TrainConfig, reward_fn: Optional[Callable] = None):
        self.cfg, self.parts = cfg, build_run(cfg, reward_fn)
        p = self.parts
        self.dist, self.data, self.reward_fn, self.engine, self.learner = p.dist, p.data, p.reward_fn, p.engine, p.learner
        self.model, self.strategy, self.sampler, self.select_rng, self.runlog = (
            p.model, p.strategy, p.sampler, p.select_rng, p.runlog)
        self.K = cfg.num_selected
        self.counters = RunCounters()
        self.premise = Premise(PremiseParams(cfg.curriculum_direction, cfg.premise_probes, cfg.premise_window_steps))
        self.ckpt_dir = self.runlog.out / "checkpoints"
        self.initial: dict = {}

    # ------------------------------------------------------------------ one step
    def step(self) -> StepMetrics:
        """One PREPO iteration: select -> roll out -> reward -> score/weight -> update -> log."""
        cfg, timer, t0 = self.cfg, Timer(), time.perf_counter()
        # 1. select: a candidate batch, its perplexities under the current policy if the strategy
        #    reads them, and the strategy's choice at the curriculum position rho
        cand = self.sampler.next_batch(cfg.candidate_batch_size)
        ppl = self.perplexity(cand, timer) if self.strategy.needs_ppl else None
        rho = pacing_rho(self.counters.steps, cfg.total_steps, cfg.pacing)
        with timer("time_select"):   # a scoring strategy's window is turned and probed by the premise estimate
            order = self.premise.select(self.strategy, ppl, cand, self.K, rho, self.select_rng)
        # 2-3. roll out G completions per selected prompt (this rank's share) and reward them
        got = self.collect(cand, order, rho, timer)
        batch, upd, gap = BatchStats(), UpdateStats(), None   # stay so when nothing was kept (dynamic sampling)
        if got.rollouts is not None:
            ro = got.rollouts
            # 4-5. score/weight: old log-probs and entropies (one no-grad pass, or on-policy the
            #      update's own forward), w_i = H_i / H_bar over all ranks' rollouts, group-normalized
            #      advantages; update the policy, then hand the rollout engine its new weights
            adv = group_advantages(got.rewards, cfg.group_size, cfg.adv_eps)
            learned = self.learner.learn(ro, adv, self.strategy.weighting, timer)
            upd = learned.update
            with timer("time_sync"):   # vLLM: returns its log-prob gap to the policy on checked syncs
                gap = self.engine.sync_weights(self.model)
            batch = batch_stats(got.rewards, learned.entropy, ro.completion_mask, learned.weights, cfg.group_size,
                                self.dist)
        # 6. log: count the step's rollouts and reward failures (all ranks), then its record
        step_rollouts = self.count(got)
        return self.step_record(got, cand, ppl, order, rho, batch, upd, step_rollouts,
                                step_times(timer, time.perf_counter() - t0), sync_gap=gap)

    # ------------------------------------------------------------------ its parts
    def perplexity(self, cand: list[int], timer: Timer) -> np.ndarray:
        """[len(cand)] prompt perplexities under the current policy (each rank scores its share)."""
        with timer("time_score"):
            mine = [self.data.train[i].prompt for i in self.dist.share(cand)]
            ppl = prompt_perplexity(self.model, self.parts.encoder, mine, impl=self.cfg.kernel_impl,
                                    max_tokens=self.cfg.max_tokens_per_microbatch,
                                    autocast=self.parts.precision.autocast)
            return np.asarray(self.dist.gather(ppl.tolist()), dtype=np.float32) if self.dist.active else ppl.numpy()

    def collect(self, cand: list[int], order: list[int], rho: float, timer: Timer) -> Collected:
        """Roll out and reward the selected prompts (this rank's share), which the strategy then
        observes; or, for a strategy that refills, dynamic sampling over fresh candidate batches.
        When rollouts were kept, the engine then sleeps (vLLM frees its GPU memory for the
        learner's passes; the weight sync after the update wakes it)."""
        train, G = self.data.train, self.cfg.group_size
        roll = lambda problems: roll_out(self.engine, self.reward_fn, problems, G, timer=timer)  # noqa: E731
        if not self.strategy.refills:
            ids = [cand[i] for i in order]
            got = collect_static(self.dist.share([train[i] for i in ids]), roll)
            self.strategy.observe(ids, got.rewards, G)
        else:
            def refill():
                nxt = self.sampler.next_batch(self.cfg.candidate_batch_size)
                return [train[nxt[i]] for i in self.strategy.select(None, nxt, self.K, rho, self.select_rng)]

            got = collect_dynamic([train[cand[i]] for i in order], refill, roll, k=self.K, group_size=G,
                                  max_rounds=self.cfg.dynamic_max_rounds, pad_id=self.parts.tokenizer.pad_token_id)
        if got.rollouts is not None:
            self.engine.sleep()
        return got

    def count(self, got: Collected) -> int:
        """Add the step's rollouts and reward failures, summed over ranks, to the run's counters;
        the step's rollouts."""
        rollouts, failures = (int(self.dist.sum(torch.tensor(n))) for n in (got.generated, got.failures))
        self.counters.add_step(rollouts, failures)
        if failures:
            log.warning("step %d: %d reward(s) could not be computed and count as 0 (%d so far)",
                        self.counters.steps, failures, self.counters.reward_failures)
        return rollouts

    def step_record(self, got: Collected, cand: list[int], ppl: Optional[np.ndarray], order: list[int], rho: float,
                    batch: BatchStats, upd: UpdateStats, step_rollouts: int, times: dict,
                    sync_gap: Optional[float] = None) -> StepMetrics:
        """The counted step's record: the selected window's perplexities and difficulty, and the
        prompts it rolled out (its selection.jsonl row), all ranks'."""
        sel_ppl = ppl[order[: self.K]] if ppl is not None else None
        levels = self.dist.gather([p.difficulty for p in got.problems])
        known = [v for v in levels if v is not None]
        pass_rates = self.dist.gather([] if got.rewards is None else
                                      got.rewards.view(-1, self.cfg.group_size).mean(1).tolist())
        picked = selection_row(rho, None if self.strategy.refills else [cand[i] for i in order], levels,
                               pass_rates, sel_ppl, ppl)
        window_ppl = ppl[order[: self.premise.window_size]] if ppl is not None else None
        self.premise.observe(ppl, order, pass_rates, step=self.counters.steps)   # the rolled-out prompts' ranks, pass rates
        c = self.counters
        return StepMetrics(
            step=c.steps, rollouts=c.rollouts, step_rollouts=step_rollouts, rho=rho,
            weight_applied=self.strategy.weighting, reward_failures=c.reward_failures, batch=batch, update=upd,
            ppl_window_lo=float(window_ppl.min()) if window_ppl is not None else None,
            ppl_window_hi=float(window_ppl.max()) if window_ppl is not None else None,
            ppl_batch_mean=float(ppl.mean()) if ppl is not None else None,
            selected_difficulty=float(np.mean(known)) if known else None, dynamic=got.dynamic,
            selection=self.strategy.stats(), premise=self.premise.stats(), times=times, picked=picked,
            engine=None if sync_gap is None else {"vllm_logprob_gap": sync_gap})

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            **self.counters.state_dict(),
            **self.learner.state_dict(),     # model, optimizer, scaler
            "sampler": self.sampler.state_dict(),
            "select_rng": self.select_rng.bit_generator.state,
            "strategy": self.strategy.state_dict(),   # the strategy's own state (GRESO's), else None
            "premise": self.premise.state_dict(),
            "rng": self.dist.gather([ckpt.rng_state()]),   # one per rank
            "metrics_lines": count_lines(self.runlog.metrics_path),
            "eval_lines": count_lines(self.runlog.eval_path),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["rng"]) != self.dist.world:
            raise RunDirError(f"the checkpoint in {self.ckpt_dir} is from {len(state['rng'])} process(es); "
                              f"resume it with as many (now {self.dist.world})")
        self.counters.load_state_dict(state)
        self.learner.load_state_dict(state)
        self.engine.sync_weights(self.model)
        self.sampler.load_state_dict(state["sampler"])
        self.select_rng.bit_generator.state = state["select_rng"]
        self.strategy.load_state_dict(state.get("strategy"))
        self.premise.load_state_dict(state.get("premise"))
        ckpt.set_rng_state(state["rng"][self.dist.rank])
        self.runlog.truncate(state["metrics_lines"], state["eval_lines"])

    # ------------------------------------------------------------------ the run
    def evaluates_at(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(self.data.eval) and ((every and step % every == 0) or step == self.cfg.total_steps)

    def start(self) -> Optional[int]:
        """Resume from the last checkpoint (``--resume``; the step it was at), or start afresh with
        the initial diagnostic (None)."""
        initial_path = self.runlog.out / "initial.json"
        state = ckpt.load_checkpoint(self.ckpt_dir) if self.cfg.resume else None
        if self.cfg.resume and state is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
        if state is None:
            self.runlog.start_fresh()
            if self.dist.main:
                self.initial = initial_diagnostic(self.parts)
                if "eval" in self.initial:
                    self.runlog.write_eval({"step": 0, "rollouts": 0, **self.initial["eval"]})
                initial_path.write_text(json.dumps(self.initial, indent=1))
            self.dist.barrier()
            return None
        self.load_state_dict(state)
        self.initial = json.loads(initial_path.read_text()) if self.dist.main else {}
        log.info("resumed from step %d (%d rollouts)", self.counters.steps, self.counters.rollouts)
        return self.counters.steps

    def fit(self) -> Optional[dict]:
        """The whole run (or its resumption); the summary on rank 0, None on the other ranks."""
        cfg, main = self.cfg, self.dist.main
        t_start = time.perf_counter()
        self.runlog.out.mkdir(parents=True, exist_ok=True)
        resumed_from = self.start()
        self.runlog.open(self.counters.steps, resumed=resumed_from is not None, initial=self.initial)
        while self.counters.steps < cfg.total_steps:
            m = self.step()
            if self.evaluates_at(m.step):
                if main:
                    ev = timed_evaluate(self.engine, self.reward_fn, self.data.eval, avg_k=cfg.eval_avg_k, seed=cfg.seed)
                    m.eval = {"eval_accuracy": ev["accuracy"], "time_eval": ev["time_eval"]}
                    if f"avg@{cfg.eval_avg_k}" in ev:
                        m.eval[f"eval_avg@{cfg.eval_avg_k}"] = ev[f"avg@{cfg.eval_avg_k}"]
                    self.runlog.write_eval({"step": m.step, "rollouts": m.rollouts, **ev})
                self.dist.barrier()
            self.runlog.write_step(m)
            if (cfg.save_every and m.step % cfg.save_every == 0) or m.step == cfg.total_steps:
                state = self.state_dict()   # every rank: it gathers the ranks' RNG states
                if main:
                    ckpt.save_checkpoint(self.ckpt_dir, state)
        self.runlog.close()
        if not main:
            return None
        c = self.counters
        return write_summary(self.runlog.out, cfg, steps=c.steps, rollouts=c.rollouts, reward_failures=c.reward_failures,
                             initial=self.initial, seconds=time.perf_counter() - t_start, resumed_from=resumed_from)


def run(config: TrainConfig | dict | None = None, *, reward_fn: Optional[Callable] = None) -> Optional[dict]:
    """Run (or resume) training; returns the summary dict (also written to output_dir/summary.json),
    or None on a data-parallel rank other than 0."""
    if config is None:
        cfg = TrainConfig().validate()
    elif isinstance(config, dict):
        cfg = from_dict(config)
    else:
        cfg = config.validate()
    # rank 0 writes the run directory; it takes the lock before the (slow) model and engine load
    with run_lock(cfg.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        trainer = Trainer(cfg, reward_fn=reward_fn)
        try:
            return trainer.fit()
        finally:
            trainer.dist.close()


def main(argv=None) -> int:
    """``python -m prepo.train [--config file.yaml] [--key value ...]``: the exit status."""
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
