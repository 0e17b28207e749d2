"""The learner: steps 4 and 5 of a PREPO iteration on one batch of rollouts (:meth:`Learner.learn`).
A no-grad pass gives the old log-probs and full-vocabulary entropies (and the reference log-probs
under a KL term); the update is DAPO-style GRPO on them (prepo_kernels.linear_grpo_loss on the
decoder's hidden states), micro-batched by a token budget, its gradients summed over the
data-parallel ranks. With one optimizer step per batch and no KL term the old log-probs are the
current ones, and the update's own forward gives the entropies (:attr:`Learner.on_policy`). The
learner owns the policy's optimizer and (fp16) loss scaler.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

import prepo_kernels
from prepo_kernels import GRPOLossParams
from prepo_kernels.hf import decoder_hidden, next_token_grpo_loss, next_token_logprob_entropy

from .config import TrainConfig
from .distributed import Dist
from .metrics import UpdateStats
from .metrics import Timer
from .microbatch import token_chunks
from .policy import Precision
from .rollout import Rollouts
from .signals.weighting import relative_entropy_weights


class PolicyPass(NamedTuple):
    """The no-grad pass over a batch's N rollouts: each [N, C] float32 on the CPU, C completion tokens."""

    logprob: Optional[torch.Tensor]        # the old policy's log-prob of each completion token (None: on-policy)
    entropy: torch.Tensor                  # its full-vocabulary entropy at each completion token (nats)
    ref_logprob: Optional[torch.Tensor]    # the reference model's log-probs (a KL term), else None


class Learned(NamedTuple):
    """What :meth:`Learner.learn` did with a batch of N rollouts of C completion tokens."""

    update: UpdateStats
    entropy: torch.Tensor                  # [N, C] float32, each completion token's entropy before the update
    weights: torch.Tensor                  # [N] PREPO's w_i = H_i / H_bar (applied only when weighting)


class Learner:
    """The policy's no-grad pass (:meth:`logprobs_and_entropies`) and update (:meth:`update`).
    ``ref_model`` is the frozen reference of a KL term (``kl_beta`` > 0), else None."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, ref_model: Optional[torch.nn.Module],
                 precision: Precision, dist: Dist):
        self.cfg, self.model, self.ref_model, self.precision, self.dist = cfg, model, ref_model, precision, dist
        self.device = precision.device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.99))
        self.scaler = precision.grad_scaler()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def on_policy(self) -> bool:
        """One optimizer step on the batch (``mini_batches`` and ``ppo_epochs`` 1) and no KL term: the
        old log-probs equal the current ones, so the ratio is exactly 1 (as TRL takes it then) and no
        old-log-prob pass runs. The entropies come from the update's own forward on the rows it
        updates (a no-grad pass only on the rows it skips), and PREPO's weights are applied
        exactly: each rollout's loss is scaled by its H_i in the forward and the summed gradient
        divided by H_bar after the last micro-batch, since w_i = H_i / H_bar enters the loss linearly."""
        c = self.cfg
        return c.mini_batches == 1 and c.ppo_epochs == 1 and c.kl_beta == 0

    def learn(self, ro: Rollouts, adv: torch.Tensor, weighting: bool, timer: Timer) -> Learned:
        """Steps 4 and 5 on ``ro``: the old log-probs and entropies, PREPO's weights (applied to the loss
        if ``weighting``) and the update; ``adv`` [N] group-normalized advantages. Timed into
        ``timer``'s time_old_logprob, time_weight and time_update."""
        if self.on_policy:
            with timer("time_old_logprob"):   # the entropies of the rows the update skips
                old = self.logprobs_and_entropies(ro, rows=(~self.rows_with_gradient(adv)).nonzero()[:, 0])
            with timer("time_update"):        # fills in the other rows' entropies
                upd = self.update(ro, adv, self.ENTROPY if weighting else None, old)
            with timer("time_weight"):
                w = relative_entropy_weights(old.entropy, ro.completion_mask, reduce=self.dist.sum)
            return Learned(upd, old.entropy, w)
        with timer("time_old_logprob"):
            old = self.logprobs_and_entropies(ro)
        with timer("time_weight"):
            w = relative_entropy_weights(old.entropy, ro.completion_mask, reduce=self.dist.sum)
        with timer("time_update"):
            upd = self.update(ro, adv, w if weighting else None, old)
        return Learned(upd, old.entropy, w)

    ENTROPY = "entropy"   # update()'s weights on-policy: this pass's own H_i, divided by H_bar at the end

    def _logprob(self, model, ids, amask, rows, *, entropy: bool):
        """The fused kernel on ``rows`` of the batch, on the model's device, under the precision's autocast."""
        with self.precision.autocast():
            return prepo_kernels.causal_lm_logprob_entropy(
                model, ids[rows].to(self.device), amask[rows].to(self.device), temperature=self.cfg.temperature,
                compute_entropy=entropy, impl=self.cfg.kernel_impl)

    @torch.no_grad()
    def logprobs_and_entropies(self, ro: Rollouts, rows: Optional[torch.Tensor] = None) -> PolicyPass:
        """The old log-probs, entropies and reference log-probs of ``ro``, micro-batched by the
        token budget. It runs on every rollout, also those the update skips: H_bar and the logged
        entropy need every rollout's entropies, and the fused kernel gets a token's log-prob from
        the same log-sum-exp as its entropy (one gather more), so leaving out the skipped rollouts'
        log-probs would save nothing. The reference pass (a KL term) has no skipped rollouts.

        ``rows`` [n] int64 (on-policy: the rows the update skips): only those rows' entropies, the
        others 0 for the update to fill; no log-probs (None)."""
        ids, amask, sl = ro.full_sequences()
        on_policy = rows is not None
        rows = torch.arange(ids.shape[0]) if rows is None else rows
        old = torch.zeros(ro.completion_mask.shape)
        ent, ref = torch.zeros_like(old), torch.zeros_like(old)
        for chunk in token_chunks(rows, ids.shape[1], self.cfg.max_tokens_per_microbatch):
            lp, h = self._logprob(self.model, ids, amask, chunk, entropy=True)
            old[chunk], ent[chunk] = lp[:, sl].float().cpu(), h[:, sl].float().cpu()
            if self.ref_model is not None:
                ref[chunk] = self._logprob(self.ref_model, ids, amask, chunk, entropy=False)[0][:, sl].float().cpu()
        return PolicyPass(None if on_policy else old, ent, ref if self.ref_model is not None else None)

    def rows_with_gradient(self, adv: torch.Tensor) -> torch.Tensor:
        """[N] bool: the rollouts whose loss has a gradient. Without a KL term a rollout whose
        advantage is 0 has a surrogate of exactly 0 at every token, whatever its ratio and weight,
        so such rollouts (all-equal reward groups) skip the forward and backward; with a KL term
        every rollout has a gradient."""
        return adv != 0 if self.cfg.kl_beta == 0 else torch.ones(adv.shape[0], dtype=torch.bool)

    def update(self, ro: Rollouts, adv: torch.Tensor, weights, old: PolicyPass) -> UpdateStats:
        """``mini_batches`` optimizer steps per epoch, each over a mini-batch split into micro-batches
        of at most ``max_tokens_per_microbatch`` padded tokens whose gradients accumulate (each
        micro-batch's loss is divided by the whole mini-batch's completion tokens, all ranks').
        ``adv`` [N] group-normalized advantages, ``weights`` [N] PREPO's w_i (None: unweighted;
        :attr:`ENTROPY`: on-policy, from this pass's entropies). ``old.logprob`` None: on-policy
        (:attr:`on_policy`), the rows updated write their entropies into ``old.entropy``.

        Only :meth:`rows_with_gradient` run forward and backward; the token-mean's denominator still
        counts the skipped rows' tokens, so the update is the same update up to float summation order.

        The loss is :meth:`_chunk_loss`: :func:`prepo_kernels.linear_grpo_loss` on the decoder's
        hidden states (without a KL term, gradients in the forward pass: three LM-head matmuls
        instead of four)."""
        cfg = self.cfg
        ids, amask, sl = ro.full_sequences()
        cmask = ro.completion_mask
        n = ids.shape[0]
        n_all = int(self.dist.sum(torch.tensor(n)))
        live = self.rows_with_gradient(adv)
        stats: list[list[float]] = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n)
            for mb in torch.tensor_split(perm, min(cfg.mini_batches, n_all)):   # as many on every rank
                if mb.numel() == 0 and not self.dist.active:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                n_tok = float(self.dist.sum(cmask[mb].sum()))
                rows = mb[live[mb]]
                acc = self._accumulate((ids, amask, cmask, sl), rows, adv, weights, old, n_tok)
                self.dist.sum_grads(self.model.parameters())   # zeros where no row ran: the step is as if they had
                if weights is self.ENTROPY and not divide_by_h_bar(self.model, acc, old.entropy, cmask, self.dist):
                    self.optimizer.zero_grad(set_to_none=True)   # H_bar not > 0: w = 1 (relative_entropy_weights)
                    return self.update(ro, adv, None, old)
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

    def _accumulate(self, seqs, rows, adv, weights, old: PolicyPass, n_tok: float) -> list[float]:
        """Forward and backward of :meth:`_chunk_loss` on ``rows`` of ``seqs`` (input ids, attention mask,
        completion mask, completion slice) in micro-batches, gradients summed; [loss, clip_frac, kl,
        ratio sum], each over the mini-batch's ``n_tok`` tokens."""
        acc = [0.0, 0.0, 0.0, 0.0]
        for chunk in token_chunks(rows, seqs[0].shape[1], self.cfg.max_tokens_per_microbatch):
            loss, *logged = self._chunk_loss(seqs, chunk, adv, weights, old, n_tok)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for i, v in enumerate([loss.item()] + logged):
                acc[i] += v
        return acc

    def _chunk_loss(self, seqs, chunk, adv, weights, old: PolicyPass, n_tok: float) -> list:
        """[loss, clip_frac, kl, ratio sum] of the micro-batch ``chunk``, each over the mini-batch's
        ``n_tok`` tokens: linear_grpo_loss (DAPO's clipped surrogate, PREPO's w_i on the advantage,
        the k3 KL term to the reference without bias correction) on the decoder's hidden states. A
        token without a gradient (w_i = 0 and no KL term) counts with a ratio of 1. On-policy
        (``old.logprob`` None) the chunk's entropies go into ``old.entropy``: from the loss itself,
        or, when they weight it (``weights`` is :attr:`ENTROPY`: w = H_i), from a no-grad LM-head
        pass on the same hidden states before it."""
        cfg, dev = self.cfg, self.device
        ids, amask = (t[chunk].to(dev) for t in seqs[:2])
        mask = seqs[2][chunk].to(dev)
        on_policy, n_keep = old.logprob is None, mask.shape[1]
        old_lp = None if on_policy else old.logprob[chunk].to(dev)
        ref_lp = None if old.ref_logprob is None else old.ref_logprob[chunk].to(dev)
        params = GRPOLossParams(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.kl_beta)
        w = None if weights is None or weights is self.ENTROPY else weights[chunk].to(dev)
        with self.precision.autocast():
            hidden, head = decoder_hidden(self.model, ids, amask)
            if weights is self.ENTROPY:
                with torch.no_grad():
                    ent = next_token_logprob_entropy(hidden.detach(), head, ids, amask, n_keep, temperature=cfg.temperature,
                                                     impl=cfg.kernel_impl)[1].float()
                w = prepo_kernels.sequence_mean(ent, mask.bool())
            loss, stats = next_token_grpo_loss(
                hidden, head, ids, amask, n_keep, old_lp, adv[chunk, None].to(dev), params=params,
                ref_logprob=ref_lp, rollout_weights=w, temperature=cfg.temperature, num_tokens=max(n_tok, 1.0),
                compute_entropy=on_policy and weights is not self.ENTROPY, impl=cfg.kernel_impl)
        if on_policy:
            old.entropy[chunk] = (ent if weights is self.ENTROPY else stats.entropy).detach().float().cpu()
        terms = stats.terms
        kl = 0.0 if terms.per_token_kl is None else ((terms.per_token_kl * mask).sum() / max(n_tok, 1.0)).item()
        ratio = (terms.coef_1 * mask).sum() / max(n_tok, 1.0)
        return [loss, stats.clip_frac.item(), kl, ratio.item()]

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


def divide_by_h_bar(model: torch.nn.Module, acc: list[float], entropy: torch.Tensor, cmask: torch.Tensor,
                    dist: Dist) -> bool:
    """On-policy weighting, once the gradients of sum_i H_i * loss_i are summed: divide them and the
    logged loss ``acc[0]`` by H_bar (all ranks' tokens; ``entropy`` and ``cmask`` [N, C]), which makes
    them those of sum_i w_i * loss_i. False (nothing divided) where H_bar is not > 0, whose weights
    are 1 (:func:`relative_entropy_weights`)."""
    totals = dist.sum(torch.stack([(entropy * cmask).sum(), cmask.sum().to(entropy.dtype)]))
    h_bar = float(totals[0] / totals[1].clamp(min=1))
    if totals[1] == 0 or h_bar <= 0:
        return False
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(h_bar)
    acc[0] /= h_bar
    return True
