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
     w_i = H_i / H_bar per rollout (detached);
  5. update: DAPO-style GRPO (group-normalized advantages, clip-higher, token-mean, each rollout's
     surrogate times w_i), micro-batched by a token budget, zero-advantage rollouts skipped when
     there is no KL term; the rollout engine gets the new weights;
  6. log one :class:`~prepo.metrics.StepMetrics`.

The parts sit behind small interfaces: the data source (:mod:`prepo.sources`) and the reward
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
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import prepo_kernels
from prepo_kernels import GRPOLossParams
from prepo_kernels.hf import decoder_hidden, next_token_grpo_loss

from . import checkpoint as ckpt
from .cli import main as cli_main
from .collect import Collected, collect_dynamic, collect_static
from .config import ConfigError, TrainConfig, from_dict, resolve_device
from .distributed import Dist
from .evaluate import evaluate, ppl_pass_rate_spearman
from .hub import resolve_model
from .loss import grpo_loss, group_advantages
from .metrics import BatchStats, StepMetrics, Timer, UpdateStats, step_times
from .microbatch import token_chunks
from .policy import Precision, load_policy
from .prompts import PromptEncoder, PromptFormat
from .report import RunLog, count_lines, selection_row, write_summary
from .rewards import load_reward_fn
from .rollout import HFGenerateEngine, Rollouts, Sampling, roll_out, stop_token_ids
from .runlock import run_lock
from .sampler import PromptSampler
from .signals.pacing import pacing_rho
from .signals.scoring import prompt_perplexity
from .signals.strategies import Strategy, get_strategy
from .signals.weighting import relative_entropy_weights
from .sources import load_data
from .warmup import get_base_model_dir

log = logging.getLogger("prepo")


VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_engine(cfg: TrainConfig, model_source, model, tokenizer, encoder: PromptEncoder, precision: Precision):
    """The rollout engine ``--rollout-engine`` names, sampling with the config's options. vLLM builds
    its own copy of ``model_source`` and gets the policy's weights after every update."""
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if cfg.rollout_engine == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(str(model_source), tokenizer, encoder, sampling, dtype=VLLM_DTYPES[cfg.dtype], seed=cfg.seed,
                          stop_ids=stop_token_ids(model, tokenizer), device=precision.device.type,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                          cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib, execution=cfg.vllm_execution)
    return HFGenerateEngine(model, tokenizer, encoder, sampling, autocast=precision.autocast)


class Trainer:
    """Holds the run's state; :meth:`step` is one PREPO iteration, :meth:`fit` the whole run."""

    def __init__(self, cfg: TrainConfig, reward_fn: Optional[Callable] = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.strategy: Strategy = get_strategy(cfg.strategy)
        self.K = cfg.num_selected
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and torch.cuda.is_available():
            log.info("running on the CPU although CUDA is available: --device cuda (or auto) uses the GPU")
        self.dist = Dist.from_env(self.device.type)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = Precision(cfg.dtype, self.device)
        torch.set_num_threads(cfg.num_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + self.dist.rank)   # ranks sample different completions

        self.data = load_data(cfg)
        self.reward_fn = reward_fn or load_reward_fn(cfg)
        self.base_dir, self.warmup_seconds = self._base_model()
        self.model, self.tokenizer = load_policy(self.base_dir, self.device,
                                                 gradient_checkpointing=cfg.gradient_checkpointing)
        self.ref_model = None
        if cfg.kl_beta > 0:
            self.ref_model, _ = load_policy(self.base_dir, self.device)
            self.ref_model.requires_grad_(False)
        self.encoder = PromptEncoder(self.tokenizer, PromptFormat(cfg.chat_template, cfg.system_prompt,
                                                                  cfg.instruction_suffix))
        self.engine = make_engine(cfg, self.base_dir, self.model, self.tokenizer, self.encoder, self.precision)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.99))
        self.scaler = self.precision.grad_scaler()
        self.sampler = PromptSampler(len(self.data.train), cfg.seed)
        self.select_rng = np.random.default_rng([cfg.seed, 31337])
        self.step_idx = 0
        self.total_rollouts = 0      # every training completion generated, all ranks
        self.reward_failures = 0     # all ranks
        self.initial: dict = {}
        self.runlog = RunLog(self.out, cfg, enabled=self.dist.main)

    def _base_model(self) -> tuple[Path | str, float]:
        """(``--model``, or the built-in warm-up checkpoint, built on first use; seconds building)."""
        if self.cfg.model:   # a GGUF file or named model is converted to a cached HF folder (once)
            return resolve_model(self.cfg.model, self.cfg.cache_dir or None), 0.0
        t0 = time.perf_counter()
        if not self.dist.main:
            self.dist.barrier()     # rank 0 builds the warm-up; the others then find it cached
        path, built = get_base_model_dir(self.cfg.warmup, Path(self.cfg.cache_dir) if self.cfg.cache_dir else None,
                                         progress=True)
        if self.dist.main:
            self.dist.barrier()
        seconds = time.perf_counter() - t0 if built else 0.0
        if built:
            log.info("warm-up model built in %.1fs -> %s", seconds, path)
        return path, seconds

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step_idx,
            "rollouts": self.total_rollouts,
            "reward_failures": self.reward_failures,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "sampler": self.sampler.state_dict(),
            "select_rng": self.select_rng.bit_generator.state,
            "strategy": self.strategy.state_dict(),   # the strategy's own state (GRESO's), else None
            "rng": self.dist.gather([ckpt.rng_state()]),   # one per rank
            "metrics_lines": count_lines(self.runlog.metrics_path),
            "eval_lines": count_lines(self.runlog.eval_path),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["rng"]) != self.dist.world:
            raise ConfigError(f"the checkpoint in {self.ckpt_dir} is from {len(state['rng'])} process(es); "
                              f"resume it with as many (now {self.dist.world})")
        self.step_idx = state["step"]
        self.total_rollouts = state["rollouts"]
        self.reward_failures = state["reward_failures"]
        self.model.load_state_dict(state["model"])
        self.engine.sync_weights(self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.select_rng.bit_generator.state = state["select_rng"]
        self.strategy.load_state_dict(state.get("strategy"))
        ckpt.set_rng_state(state["rng"][self.dist.rank])
        self.runlog.truncate(state["metrics_lines"], state["eval_lines"])

    # ------------------------------------------------------------------ one step
    def step(self) -> StepMetrics:
        """One PREPO iteration: select -> roll out -> reward -> score/weight -> update -> log."""
        cfg, timer, t0 = self.cfg, Timer(), time.perf_counter()
        # 1. select: a candidate batch, its perplexities under the current policy if the strategy
        #    reads them, and the strategy's choice at the curriculum position rho
        cand = self.sampler.next_batch(cfg.candidate_batch_size)
        ppl = self.perplexity(cand, timer) if self.strategy.needs_ppl else None
        rho = pacing_rho(self.step_idx, cfg.total_steps, cfg.pacing)
        with timer("time_score"):
            order = self.strategy.select(ppl, cand, self.K, rho, self.select_rng)
        # 2-3. roll out G completions per selected prompt (this rank's share) and reward them
        got = self.collect(cand, order, rho, timer)
        batch, upd = BatchStats(), UpdateStats()   # stay so when nothing was kept (dynamic sampling)
        if got.rollouts is not None:
            ro = got.rollouts
            # 4. score/weight: old log-probs and entropies in one no-grad pass, w_i = H_i / H_bar
            #    over all ranks' rollouts, group-normalized advantages
            self.engine.sleep()   # vLLM: free its GPU memory for the passes below; sync_weights wakes it
            with timer("time_old_logprob"):
                old_lp, ent, ref_lp = self.old_logprobs(ro)
            with timer("time_weight"):
                w = relative_entropy_weights(ent, ro.completion_mask, reduce=self.dist.sum)
            adv = group_advantages(got.rewards, cfg.group_size, cfg.adv_eps)
            # 5. update the policy, then hand the rollout engine its new weights
            with timer("time_update"):
                upd = self.update(ro, adv, w if self.strategy.weighting else None, old_lp, ref_lp)
            with timer("time_sync"):
                self.engine.sync_weights(self.model)
            batch = self.batch_stats(got.rewards, ent, ro.completion_mask, w)
        # 6. log: the step's record (counters summed over ranks)
        return self.record(got, cand, ppl, order, rho, batch, upd, timer, t0)

    # ------------------------------------------------------------------ its parts
    def perplexity(self, cand: list[int], timer: Timer) -> np.ndarray:
        """[len(cand)] prompt perplexities under the current policy (each rank scores its share)."""
        with timer("time_score"):
            mine = [self.data.train[i].prompt for i in self.dist.share(cand)]
            ppl = prompt_perplexity(self.model, self.encoder, mine, impl=self.cfg.kernel_impl,
                                    max_tokens=self.cfg.max_tokens_per_microbatch, autocast=self.precision.autocast)
            return np.asarray(self.dist.gather(ppl.tolist()), dtype=np.float32) if self.dist.active else ppl.numpy()

    def collect(self, cand: list[int], order: list[int], rho: float, timer: Timer) -> Collected:
        """Roll out and reward the selected prompts (this rank's share), which the strategy then
        observes; or, for a strategy that refills, dynamic sampling over fresh candidate batches."""
        train, G = self.data.train, self.cfg.group_size
        roll = lambda problems: roll_out(self.engine, self.reward_fn, problems, G, timer=timer)  # noqa: E731
        if not self.strategy.refills:
            ids = [cand[i] for i in order]
            got = collect_static(self.dist.share([train[i] for i in ids]), roll)
            self.strategy.observe(ids, got.rewards, G)
            return got

        def refill():
            nxt = self.sampler.next_batch(self.cfg.candidate_batch_size)
            return [train[nxt[i]] for i in self.strategy.select(None, nxt, self.K, rho, self.select_rng)]

        return collect_dynamic([train[cand[i]] for i in order], refill, roll, k=self.K, group_size=G,
                               max_rounds=self.cfg.dynamic_max_rounds, pad_id=self.tokenizer.pad_token_id)

    def record(self, got: Collected, cand: list[int], ppl: Optional[np.ndarray], order: list[int], rho: float,
               batch: BatchStats, upd: UpdateStats, timer: Timer, t0: float) -> StepMetrics:
        """The step's bookkeeping: rollouts and reward failures summed over ranks into the run's
        counters, the selected window's perplexities, and the step record with the prompts it rolled
        out (its selection.jsonl row)."""
        failures = int(self.dist.sum(torch.tensor(got.failures)))
        self.reward_failures += failures
        if failures:
            log.warning("step %d: %d reward(s) could not be computed and count as 0 (%d so far)",
                        self.step_idx + 1, failures, self.reward_failures)
        self.step_idx += 1
        step_rollouts = int(self.dist.sum(torch.tensor(got.generated)))
        self.total_rollouts += step_rollouts
        sel_ppl = ppl[order[: self.K]] if ppl is not None else None
        levels = self.dist.gather([p.difficulty for p in got.problems])
        known = [v for v in levels if v is not None]
        pass_rates = [] if got.rewards is None else got.rewards.view(-1, self.cfg.group_size).mean(1).tolist()
        picked = selection_row(rho, None if self.strategy.refills else [cand[i] for i in order], levels,
                               self.dist.gather(pass_rates), sel_ppl, ppl)
        return StepMetrics(
            step=self.step_idx, rollouts=self.total_rollouts, step_rollouts=step_rollouts, rho=rho,
            weight_applied=self.strategy.weighting, reward_failures=self.reward_failures, batch=batch, update=upd,
            ppl_window_lo=float(sel_ppl.min()) if sel_ppl is not None else None,
            ppl_window_hi=float(sel_ppl.max()) if sel_ppl is not None else None,
            ppl_batch_mean=float(ppl.mean()) if ppl is not None else None,
            selected_difficulty=float(np.mean(known)) if known else None, dynamic=got.dynamic,
            selection=self.strategy.stats(), times=step_times(timer, time.perf_counter() - t0), picked=picked)

    def batch_stats(self, rewards, ent, cmask, w) -> BatchStats:
        """Rewards, entropy and weights of the global batch (all ranks' rollouts)."""
        if self.dist.active:
            rewards, w = torch.tensor(self.dist.gather(rewards.tolist())), torch.tensor(self.dist.gather(w.tolist()))
        totals = self.dist.sum(torch.stack([(ent * cmask).sum(), cmask.sum().to(ent.dtype)]))
        n_tok = totals[1].item()
        return BatchStats(
            reward_mean=float(rewards.mean()),
            zero_adv_frac=float((rewards.view(-1, self.cfg.group_size).std(dim=1) == 0).float().mean()),
            entropy_mean=float(totals[0] / max(n_tok, 1)),
            weight_min=float(w.min()), weight_max=float(w.max()),
            weight_p10=float(w.quantile(0.1)), weight_p90=float(w.quantile(0.9)),
            completion_len=n_tok / w.numel())

    def _logprob(self, model, ids, amask, rows, *, entropy: bool):
        """The fused kernel on ``rows`` of the batch, on the model's device, under the precision's autocast."""
        with self.precision.autocast():
            return prepo_kernels.causal_lm_logprob_entropy(
                model, ids[rows].to(self.device), amask[rows].to(self.device), temperature=self.cfg.temperature,
                compute_entropy=entropy, impl=self.cfg.kernel_impl)

    @torch.no_grad()
    def old_logprobs(self, ro: Rollouts):
        """(old log-probs, entropies, reference log-probs or None), each [N, C] float32 on the CPU,
        micro-batched by the token budget. It runs on every rollout, also those the update skips:
        H_bar and the logged entropy need every rollout's entropies, and the fused kernel gets a
        token's log-prob from the same log-sum-exp as its entropy (one gather more), so leaving out
        the skipped rollouts' log-probs would save nothing. The reference pass (a KL term) has no
        skipped rollouts."""
        ids, amask, sl = ro.full_sequences()
        old, ent, ref = [], [], []
        for rows in token_chunks(torch.arange(ids.shape[0]), ids.shape[1], self.cfg.max_tokens_per_microbatch):
            lp, h = self._logprob(self.model, ids, amask, rows, entropy=True)
            old.append(lp[:, sl].float().cpu())
            ent.append(h[:, sl].float().cpu())
            if self.ref_model is not None:
                ref.append(self._logprob(self.ref_model, ids, amask, rows, entropy=False)[0][:, sl].float().cpu())
        return torch.cat(old), torch.cat(ent), torch.cat(ref) if ref else None

    def update(self, ro: Rollouts, adv: torch.Tensor, weights: Optional[torch.Tensor], old_lp: torch.Tensor,
               ref_lp: Optional[torch.Tensor], *, skip_zero_adv: bool = True, fused_loss: bool = True) -> UpdateStats:
        """``mini_batches`` optimizer steps per epoch, each over a mini-batch split into micro-batches
        of at most ``max_tokens_per_microbatch`` padded tokens whose gradients accumulate (each
        micro-batch's loss is divided by the whole mini-batch's completion tokens, all ranks').

        Without a KL term (``kl_beta`` 0) a rollout whose advantage is 0 has a surrogate of exactly 0
        at every token, whatever its ratio and weight, so it adds nothing to the gradient: such
        rollouts (all-equal reward groups) skip the forward and backward (``skip_zero_adv``; False
        runs them, for tests). The token-mean's denominator still counts their tokens, so the update
        is the same update up to float summation order. With a KL term every rollout has a gradient.

        The loss is :func:`prepo_kernels.linear_grpo_loss` on the decoder's hidden states (gradients
        in the forward pass, three LM-head matmuls instead of four) where :meth:`fused_loss_applies`,
        else the fused log-probs through :func:`prepo.loss.grpo_loss` (``fused_loss`` False: always
        the latter, for tests); the two give the same update and statistics up to float rounding."""
        cfg = self.cfg
        ids, amask, sl = ro.full_sequences()
        cmask = ro.completion_mask
        n = ids.shape[0]
        n_all = int(self.dist.sum(torch.tensor(n)))
        live = adv != 0 if skip_zero_adv and cfg.kl_beta == 0 else torch.ones(n, dtype=torch.bool)
        fused = fused_loss and self.fused_loss_applies(weights, live)
        stats: list[list[float]] = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n)
            for mb in torch.tensor_split(perm, min(cfg.mini_batches, n_all)):   # as many on every rank
                if mb.numel() == 0 and not self.dist.active:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                n_tok = float(self.dist.sum(cmask[mb].sum()))
                rows = mb[live[mb]]
                acc = self._accumulate((ids, amask, cmask, sl), rows, adv, weights, old_lp, ref_lp, n_tok,
                                       fused=fused)
                self.dist.sum_grads(self.model.parameters())   # zeros where no row ran: the step is as if they had
                upd_frac = float(self.dist.sum(cmask[rows].sum())) / max(n_tok, 1.0)
                stats.append(acc + [self.optimizer_step(), upd_frac])
        if self.dist.active:   # each rank's parts of the token means add up to the global batch's
            summed = self.dist.sum(torch.tensor(stats, dtype=torch.float64)[:, :4])
            stats = [list(row) + s[4:] for row, s in zip(summed.tolist(), stats)]
        for s in stats:   # the mean ratio over the tokens updated (1: none were)
            s[3] = s[3] / s[5] if s[5] > 0 else 1.0
        loss, clip, kl, ratio, gnorm, _ = np.mean(stats, axis=0).tolist()
        skipped = int(self.dist.sum(torch.tensor(int((~live).sum()))))
        return UpdateStats(loss=loss, clip_frac=clip, kl=kl, ratio_mean=ratio, grad_norm=gnorm,
                           skipped_rollouts=skipped)

    def _accumulate(self, seqs, rows, adv, weights, old_lp, ref_lp, n_tok: float, *, fused: bool) -> list[float]:
        """Forward and backward of the GRPO loss on ``rows`` of ``seqs`` (input ids, attention mask,
        completion mask, completion slice) in micro-batches, gradients summed; [loss, clip_frac, kl,
        ratio sum], each over the mini-batch's ``n_tok`` tokens. ``fused``: :meth:`_fused_chunk_loss`,
        else :meth:`_chunk_loss`."""
        chunk_loss = self._fused_chunk_loss if fused else self._chunk_loss
        acc = [0.0, 0.0, 0.0, 0.0]
        for chunk in token_chunks(rows, seqs[0].shape[1], self.cfg.max_tokens_per_microbatch):
            loss, *logged = chunk_loss(seqs, chunk, adv, weights, old_lp, ref_lp, n_tok)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for i, v in enumerate([loss.item()] + logged):
                acc[i] += v
        return acc

    def _chunk_loss(self, seqs, chunk, adv, weights, old_lp, ref_lp, n_tok: float) -> list:
        """[loss, clip_frac, kl, ratio sum] of the micro-batch ``chunk``: the fused log-probs through
        :func:`prepo.loss.grpo_loss`."""
        cfg, dev = self.cfg, self.device
        ids, amask, cmask, sl = seqs
        lp, _ = self._logprob(self.model, ids, amask, chunk, entropy=False)
        out = grpo_loss(
            lp[:, sl], old_lp[chunk].to(dev), adv[chunk].to(dev), cmask[chunk].to(dev),
            None if weights is None else weights[chunk].to(dev), eps_low=cfg.eps_low,
            eps_high=cfg.eps_high, ref_logprob=None if ref_lp is None else ref_lp[chunk].to(dev),
            kl_beta=cfg.kl_beta, num_tokens=n_tok)
        return [out.loss, out.clip_frac, out.kl, out.ratio_mean]

    def fused_loss_applies(self, weights: Optional[torch.Tensor], live: torch.Tensor) -> bool:
        """Whether the update can use linear_grpo_loss, which is the surrogate alone: not with a KL
        term (its gradient needs the reference log-prob of every token, and the op skips the
        zero-advantage rows that a KL term still moves), not where ``kernel_impl`` runs a log-prob
        backend the op lacks ("cuda": its log-prob kernel beats the op's PyTorch row chunks; on
        GPUs "auto" is "triton", which the op has), and not when an updated rollout's weight is 0
        (the op takes A w as one advantage and skips such a row, whose ratio and clip statistics
        grpo_loss counts)."""
        if self.cfg.kl_beta != 0:
            return False
        return weights is None or bool((weights[live] != 0).all())

    def _fused_chunk_loss(self, seqs, chunk, adv, weights, old_lp, ref_lp, n_tok: float) -> list:
        """:meth:`_chunk_loss` by linear_grpo_loss on the decoder's hidden states (no KL term: ``ref_lp``
        is None). PREPO's weight is multiplied into the advantage (w > 0, so min(r A, clip(r) A) w =
        min(r A w, clip(r) A w), and the clipped tokens are the same); the ratio sum is over the
        computed tokens, which are the completion tokens of the rows (all of non-zero advantage)."""
        cfg, dev = self.cfg, self.device
        ids, amask = (t[chunk].to(dev) for t in seqs[:2])
        a = adv[chunk] if weights is None else adv[chunk] * weights[chunk]
        old = old_lp[chunk].to(dev)
        with self.precision.autocast():
            hidden, head = decoder_hidden(self.model, ids, amask)
            loss, stats = next_token_grpo_loss(
                hidden, head, ids, amask, old.shape[1], old, a[:, None].to(dev), temperature=cfg.temperature,
                params=GRPOLossParams(eps_low=cfg.eps_low, eps_high=cfg.eps_high), num_tokens=max(n_tok, 1.0),
                impl=cfg.kernel_impl)
        ratio = torch.where(stats.computed, torch.exp(stats.logprob - old), 0).sum() / max(n_tok, 1.0)
        return [loss, stats.clip_frac.item(), 0.0, ratio.item()]

    def optimizer_step(self) -> float:
        """Clip the gradient norm, step (through the fp16 loss scaler when there is one); the norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return gnorm

    # ------------------------------------------------------------------ evaluation
    def run_eval(self) -> dict:
        t0 = time.perf_counter()
        res = evaluate(self.engine, self.reward_fn, self.data.eval, avg_k=self.cfg.eval_avg_k, seed=self.cfg.seed)
        res["time_eval"] = round(time.perf_counter() - t0, 6)
        return res

    def initial_diagnostic(self) -> dict:
        """Before training: Spearman(prompt perplexity, pass rate) and the step-0 evaluation."""
        cfg = self.cfg
        initial = {"warmup_seconds": self.warmup_seconds, "base_model": str(self.base_dir), "data": self.data.skipped}
        if cfg.spearman_prompts > 0:
            t0 = time.perf_counter()
            pool = self.data.spearman_pool(cfg)
            initial.update(ppl_pass_rate_spearman(
                self.model, self.engine, self.reward_fn, pool, cfg.spearman_samples, seed=cfg.seed,
                impl=cfg.kernel_impl, max_tokens=cfg.max_tokens_per_microbatch, autocast=self.precision.autocast))
            initial["time_spearman"] = time.perf_counter() - t0
            log.info("initial Spearman(prompt ppl, pass rate) = %.3f over %d prompts (pass-rate histogram %s)",
                     initial["spearman_ppl_passrate"], len(pool), initial["pass_rate_hist"])
        if self.data.eval:
            ev = self.run_eval()
            initial["eval"] = ev
            self.runlog.write_eval({"step": 0, "rollouts": 0, **ev})
            log.info("initial held-out greedy accuracy %.3f", ev["accuracy"])
        return initial

    # ------------------------------------------------------------------ the run
    def evaluates_at(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(self.data.eval) and ((every and step % every == 0) or step == self.cfg.total_steps)

    def fit(self) -> Optional[dict]:
        """The whole run (or its resumption); the summary on rank 0, None on the other ranks."""
        cfg, main = self.cfg, self.dist.main
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
            self.initial = json.loads(initial_path.read_text()) if main else {}
            log.info("resumed from step %d (%d rollouts)", self.step_idx, self.total_rollouts)
        else:
            self.runlog.start_fresh()
            if main:
                self.initial = self.initial_diagnostic()
                initial_path.write_text(json.dumps(self.initial, indent=1))
            self.dist.barrier()
        self.runlog.open(self.step_idx, resumed=resumed_from is not None, initial=self.initial)
        while self.step_idx < cfg.total_steps:
            m = self.step()
            if self.evaluates_at(m.step):
                if main:
                    ev = self.run_eval()
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
        return write_summary(self.out, cfg, steps=self.step_idx, rollouts=self.total_rollouts,
                             reward_failures=self.reward_failures, initial=self.initial,
                             seconds=time.perf_counter() - t_start, resumed_from=resumed_from)


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
