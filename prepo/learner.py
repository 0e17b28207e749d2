"""The learner: steps 4 and 5 of a PREPO iteration on one batch of rollouts. A no-grad pass gives
the old log-probs and full-vocabulary entropies (and the reference log-probs under a KL term);
the update is DAPO-style GRPO on them (prepo_kernels.linear_grpo_loss on the decoder's hidden
states), micro-batched by a token budget, its gradients summed over the data-parallel ranks. The learner owns the policy's optimizer and (fp16) loss scaler.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

import prepo_kernels
from prepo_kernels import GRPOLossParams
from prepo_kernels.hf import decoder_hidden, next_token_grpo_loss

from .config import TrainConfig
from .distributed import Dist
from .metrics import UpdateStats
from .microbatch import token_chunks
from .policy import Precision
from .rollout import Rollouts


class PolicyPass(NamedTuple):
    """The no-grad pass over a batch's N rollouts: each [N, C] float32 on the CPU, C completion tokens."""

    logprob: torch.Tensor                  # the old policy's log-prob of each completion token
    entropy: torch.Tensor                  # its full-vocabulary entropy at each completion token (nats)
    ref_logprob: Optional[torch.Tensor]    # the reference model's log-probs (a KL term), else None


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

    def _logprob(self, model, ids, amask, rows, *, entropy: bool):
        """The fused kernel on ``rows`` of the batch, on the model's device, under the precision's autocast."""
        with self.precision.autocast():
            return prepo_kernels.causal_lm_logprob_entropy(
                model, ids[rows].to(self.device), amask[rows].to(self.device), temperature=self.cfg.temperature,
                compute_entropy=entropy, impl=self.cfg.kernel_impl)

    @torch.no_grad()
    def logprobs_and_entropies(self, ro: Rollouts) -> PolicyPass:
        """The old log-probs, entropies and reference log-probs of ``ro``, micro-batched by the
        token budget. It runs on every rollout, also those the update skips: H_bar and the logged
        entropy need every rollout's entropies, and the fused kernel gets a token's log-prob from
        the same log-sum-exp as its entropy (one gather more), so leaving out the skipped rollouts'
        log-probs would save nothing. The reference pass (a KL term) has no skipped rollouts."""
        ids, amask, sl = ro.full_sequences()
        old, ent, ref = [], [], []
        for rows in token_chunks(torch.arange(ids.shape[0]), ids.shape[1], self.cfg.max_tokens_per_microbatch):
            lp, h = self._logprob(self.model, ids, amask, rows, entropy=True)
            old.append(lp[:, sl].float().cpu())
            ent.append(h[:, sl].float().cpu())
            if self.ref_model is not None:
                ref.append(self._logprob(self.ref_model, ids, amask, rows, entropy=False)[0][:, sl].float().cpu())
        return PolicyPass(torch.cat(old), torch.cat(ent), torch.cat(ref) if ref else None)

    def rows_with_gradient(self, adv: torch.Tensor) -> torch.Tensor:
        """[N] bool: the rollouts whose loss has a gradient. Without a KL term a rollout whose
        advantage is 0 has a surrogate of exactly 0 at every token, whatever its ratio and weight,
        so such rollouts (all-equal reward groups) skip the forward and backward; with a KL term
        every rollout has a gradient."""
        return adv != 0 if self.cfg.kl_beta == 0 else torch.ones(adv.shape[0], dtype=torch.bool)

    def update(self, ro: Rollouts, adv: torch.Tensor, weights: Optional[torch.Tensor], old: PolicyPass) -> UpdateStats:
        """``mini_batches`` optimizer steps per epoch, each over a mini-batch split into micro-batches
        of at most ``max_tokens_per_microbatch`` padded tokens whose gradients accumulate (each
        micro-batch's loss is divided by the whole mini-batch's completion tokens, all ranks').
        ``adv`` [N] group-normalized advantages, ``weights`` [N] PREPO's w_i (None: unweighted).

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
        token without a gradient (w_i = 0 and no KL term) counts with a ratio of 1."""
        cfg, dev = self.cfg, self.device
        ids, amask = (t[chunk].to(dev) for t in seqs[:2])
        mask = seqs[2][chunk].to(dev)
        old_lp = old.logprob[chunk].to(dev)
        ref_lp = None if old.ref_logprob is None else old.ref_logprob[chunk].to(dev)
        params = GRPOLossParams(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.kl_beta)
        with self.precision.autocast():
            hidden, head = decoder_hidden(self.model, ids, amask)
            loss, stats = next_token_grpo_loss(
                hidden, head, ids, amask, old_lp.shape[1], old_lp, adv[chunk, None].to(dev), params=params,
                ref_logprob=ref_lp, rollout_weights=None if weights is None else weights[chunk].to(dev),
                temperature=cfg.temperature, num_tokens=max(n_tok, 1.0), impl=cfg.kernel_impl)
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
