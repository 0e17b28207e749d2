"""PREPO on TRL's GRPO: :class:`PrepoGRPOTrainer` and :class:`PrepoGRPOConfig`, used exactly like
``trl.GRPOTrainer`` / ``trl.GRPOConfig`` (same constructor, dataset format and reward functions).

Three parts, each switched by one config flag (all off is plain TRL GRPO):

* ``prepo_curriculum``: the dataloader yields a candidate batch ``prepo_candidate_multiple`` times
  the generation batch's prompts (``|B| = m K``, K = generation_batch_size / num_generations). At
  generation time every rank scores its share of the candidates' prompt perplexities under the
  current policy (fused, no logits held), the scores and rows are gathered, and every rank picks the
  same window: the K consecutive prompts starting at ``floor(rho (|B| - K))`` of the ascending
  order, ``rho = global_step / max_steps``. Each chosen prompt is repeated num_generations times
  (TRL's group layout) and each rank keeps its slice. The candidate order is TRL's seeded sampler
  and rho comes from the global step, so both resume from a TRL checkpoint with the Trainer's own
  data skipping; there is no other curriculum state.
* ``prepo_entropy_weighting``: each completion's advantage is multiplied by ``w_i = H_i / H_bar``
  (H_i its mean token entropy under the current policy at the sampling temperature, H_bar the
  token-weighted mean over the whole generation batch of all ranks; detached). The entropies come
  from the no-grad fused pass TRL makes for the old log-probs when it makes one, otherwise from one
  extra no-grad fused pass.
* ``prepo_fused_logprobs``: log-probs and entropies (loss, old and reference log-probs) come from
  prepo_kernels' fused LM head instead of TRL's (text-only models with a linear LM head; DDP yes,
  FSDP / ZeRO-3 sharded heads no), and the loss itself is ``prepo_kernels.linear_grpo_loss`` for
  every combination of TRL's loss options (loss_type, importance_sampling_level, delta, beta and
  use_bias_correction_kl, the entropy bonus, fixed or adaptive, top_entropy_quantile, vLLM's
  importance sampling, off_policy_mask_threshold): gradients in the forward pass (three LM-head
  matmuls instead of four, rows without a gradient skipped) where each token's gradient is its own,
  two passes otherwise; TRL's metrics are logged with their own definitions.

Logged in the trainer's log history: ``prepo/ppl_window_lo``, ``prepo/ppl_window_hi``,
``prepo/candidates_scored`` (curriculum) and ``prepo/weight_min``, ``prepo/weight_max`` (weighting).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from packaging.version import Version

import prepo_kernels
import trl
from trl import GRPOConfig, GRPOTrainer

from prepo_kernels import GRPOLossParams, linear_grpo_loss
from prepo_kernels.hf import IGNORE, next_token_logprob_entropy, next_token_targets, tail_of
from trl.trainer.utils import nanmax, nanmin

from ..hub import resolve_model
from ..signals.pacing import pacing_rho, window_select
from ..signals.weighting import relative_entropy_weights
from .hf_fused import tail_hidden, tail_logprob_entropy

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [lo, hi): the overridden methods' contracts
if not SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]:
    raise ImportError(f"prepo.integrations.trl supports trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}; "
                      f"found trl {trl.__version__} (pip install 'prepo[trl]')")


@dataclass
class PrepoGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus PREPO's switches (all False gives plain TRL GRPO)."""

    prepo_curriculum: bool = field(default=True, metadata={
        "help": "Roll out the perplexity window of a larger candidate batch (PREPO's curriculum)."})
    prepo_candidate_multiple: int = field(default=5, metadata={
        "help": "Candidate batch size over rolled-out prompts, |B| / K (5 gives K / |B| = 20%)."})
    prepo_entropy_weighting: bool = field(default=True, metadata={
        "help": "Multiply each completion's advantage by its relative entropy H_i / H_bar."})
    prepo_fused_logprobs: bool = field(default=True, metadata={
        "help": "Compute log-probs and entropies with prepo_kernels' fused LM head instead of TRL's."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.prepo_candidate_multiple, bool) or not isinstance(self.prepo_candidate_multiple, int) \
                or self.prepo_candidate_multiple < 1:
            raise ValueError(f"prepo_candidate_multiple must be an int >= 1, got {self.prepo_candidate_multiple!r}")


class CandidateSampler(torch.utils.data.Sampler):
    """Dataset indices for the curriculum's candidate batches: each epoch's order (a permutation
    seeded by (seed, epoch), or the identity without shuffling) is cut into batches of
    ``batch_size`` distinct indices (an incomplete tail is dropped), each yielded ``repeat_count``
    times in a row (once per step that reuses one generation). The Trainer sets the epoch, also
    when it resumes, so a resumed run sees the uninterrupted run's order."""

    def __init__(self, num_items: int, batch_size: int, repeat_count: int, shuffle: bool, seed: int):
        self.num_items, self.batch_size, self.repeat_count = num_items, batch_size, repeat_count
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        for start in range(0, len(self) // self.repeat_count, self.batch_size):
            batch = order[start : start + self.batch_size].tolist()
            for _ in range(self.repeat_count):
                yield from batch

    def __len__(self) -> int:
        return (self.num_items // self.batch_size) * self.batch_size * self.repeat_count


class PrepoGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with PREPO's curriculum, relative-entropy weighting and fused log-probs.

    Overrides: ``get_train_dataloader`` / ``_get_train_sampler`` (candidate batches),
    ``_generate_and_score_completions`` (window before generation, weights after the advantages),
    ``_get_per_token_logps_and_entropies`` (fused log-probs and entropies), ``_compute_loss`` (the
    fused GRPO loss).
    """

    def __init__(self, model, reward_funcs=None, args: PrepoGRPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = PrepoGRPOConfig(f"{name.rstrip('/').split('/')[-1]}-PREPO")
        if not isinstance(args, PrepoGRPOConfig):
            raise TypeError(f"PrepoGRPOTrainer needs a PrepoGRPOConfig, got {type(args).__name__}")
        model = resolve_model(model) if isinstance(model, str) else model   # GGUF files and named models
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self._fused_passes: list[tuple[torch.Tensor, torch.Tensor]] = []
        if args.prepo_curriculum:
            self._check_curriculum_setup()

    # ---------------------------------------------------------------- curriculum
    @property
    def window_size(self) -> int:
        """K: distinct prompts rolled out per generation batch (all ranks)."""
        return self.args.generation_batch_size // self.num_generations

    @property
    def candidate_batch_size(self) -> int:
        """|B| = prepo_candidate_multiple * K: prompts scored per generation batch (all ranks)."""
        return self.args.prepo_candidate_multiple * self.window_size

    def _check_curriculum_setup(self) -> None:
        dataset = self.train_dataset
        if not hasattr(dataset, "__len__") or isinstance(dataset, (torch.utils.data.IterableDataset,
                                                                   datasets.IterableDataset)):
            raise ValueError("prepo_curriculum needs a map-style train_dataset (it indexes candidate batches); "
                             "got an iterable or no dataset")
        if self.environment_factories is not None or self.rollout_func is not None or self._is_vlm:
            raise ValueError("prepo_curriculum supports text prompts generated by the trainer itself (no "
                             "environment_factory, rollout_func or vision-language model)")
        if len(dataset) < self.candidate_batch_size:
            raise ValueError(f"train_dataset has {len(dataset)} prompts, fewer than one candidate batch "
                             f"(prepo_candidate_multiple * K = {self.candidate_batch_size})")
        if self.candidate_batch_size % self.accelerator.num_processes:
            raise ValueError(f"the candidate batch ({self.candidate_batch_size} prompts) must split evenly over "
                             f"{self.accelerator.num_processes} processes")

    def get_train_dataloader(self):
        if not self.args.prepo_curriculum:
            return super().get_train_dataloader()
        return self._get_dataloader(
            dataset=self.train_dataset, description="Training",
            batch_size=self.candidate_batch_size // self.accelerator.num_processes,
            sampler_fn=self._get_train_sampler, is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        if not self.args.prepo_curriculum:
            return super()._get_train_sampler(dataset)
        # Distinct candidates (the window is repeated num_generations times after selection).
        return CandidateSampler(
            len(self.train_dataset if dataset is None else dataset), self.candidate_batch_size,
            repeat_count=self.num_iterations * self.args.steps_per_generation, shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _score_candidates(self, prompts: list) -> torch.Tensor:
        """Prompt perplexity [len(prompts)] float32 under the current policy (temperature 1), on the
        prompts exactly as TRL tokenizes them for generation (chat template applied)."""
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        width = max(max(len(ids) for ids in prompt_ids), 2)
        input_ids = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # padding is masked: any id will do
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.accelerator.device), mask.to(self.accelerator.device)
        logprob = self._fused_no_grad(input_ids, mask, width - 1, temperature=1.0, compute_entropy=False)[0]
        return prepo_kernels.sequence_perplexity(logprob, mask[:, 1:].bool())

    def _select_window(self, inputs: list[dict]) -> list[dict]:
        """This rank's rows of the window: ``inputs`` is this rank's share of the candidate batch;
        returns K * num_generations / num_processes rows, each chosen prompt num_generations times
        in a row, the same selection on every rank."""
        candidates = gather_object(inputs)  # every rank: all candidates, in rank order
        ppl = self.accelerator.gather(self._score_candidates([x["prompt"] for x in inputs])).cpu()
        rho = pacing_rho(self.state.global_step, self.state.max_steps)
        chosen = window_select(ppl.numpy(), self.window_size, rho)
        window = [candidates[i] for i in chosen for _ in range(self.num_generations)]
        n_local = len(window) // self.accelerator.num_processes
        rank = self.accelerator.process_index
        metrics = self._metrics["train"]
        metrics["prepo/ppl_window_lo"].append(ppl[chosen].min().item())
        metrics["prepo/ppl_window_hi"].append(ppl[chosen].max().item())
        metrics["prepo/candidates_scored"].append(float(len(candidates)))
        return window[rank * n_local : (rank + 1) * n_local]

    # ---------------------------------------------------------------- weighting
    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        if training and self.args.prepo_curriculum:
            inputs = self._select_window(inputs)
        self._fused_passes.clear()
        output = super()._generate_and_score_completions(inputs)
        if training and self.args.prepo_entropy_weighting:
            output["advantages"] = output["advantages"] * self._rollout_weights(output)
        self._fused_passes.clear()
        return output

    def _rollout_weights(self, output: dict) -> torch.Tensor:
        """w [local completions]: relative entropy over the whole generation batch of all ranks."""
        mask = output["completion_mask"] * output.get("tool_mask", 1)
        old = output.get("old_per_token_logps")
        # TRL's no-grad pass for the old log-probs (when it made one through our fused path) already
        # holds the entropies; otherwise this is PREPO's one extra fused pass.
        entropy = next((ent for logps, ent in self._fused_passes if logps is old), None) if old is not None else None
        if entropy is None:
            entropy = self._completion_entropy(output)
        entropy = self.accelerator.pad_across_processes(entropy, dim=1)
        mask = self.accelerator.pad_across_processes(mask, dim=1)
        w_all = relative_entropy_weights(self.accelerator.gather(entropy), self.accelerator.gather(mask))
        metrics = self._metrics["train"]
        metrics["prepo/weight_min"].append(w_all.min().item())
        metrics["prepo/weight_max"].append(w_all.max().item())
        n_local = output["completion_ids"].size(0)
        rank = self.accelerator.process_index
        return w_all[rank * n_local : (rank + 1) * n_local].to(output["advantages"].dtype)

    def _completion_entropy(self, output: dict) -> torch.Tensor:
        """[B, completion length] token entropies of the completions under the current policy."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        return self._fused_no_grad(input_ids, mask, output["completion_ids"].size(1), temperature=self.temperature,
                                   compute_entropy=True)[1]

    # ---------------------------------------------------------------- fused log-probs
    def _fused_no_grad(self, input_ids, mask, n_keep, *, temperature, compute_entropy):
        """tail_logprob_entropy of the policy, no grad, in chunks of per_device_train_batch_size rows."""
        chunk = self.args.per_device_train_batch_size
        parts = []
        with torch.no_grad():
            for start in range(0, input_ids.size(0), chunk):
                parts.append(self._fused(self.model, input_ids[start : start + chunk], mask[start : start + chunk],
                                         n_keep, temperature=temperature, compute_entropy=compute_entropy))
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))

    def _fused(self, model, input_ids, mask, n_keep, *, temperature, compute_entropy):
        with self.accelerator.autocast():
            return tail_logprob_entropy(model, self.accelerator.unwrap_model(model), input_ids, mask, n_keep,
                                        temperature=temperature, compute_entropy=compute_entropy)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **model_extras):
        if not self.args.prepo_fused_logprobs:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **model_extras)
        extras = sorted(k for k, v in model_extras.items() if v is not None)
        if compute_aux_loss or extras:
            raise ValueError("prepo_fused_logprobs supports text-only models without an MoE aux loss; got "
                             f"{extras or ['compute_aux_loss']}: set prepo_fused_logprobs=False")
        # A no-grad pass of the policy (TRL's old log-probs) also yields the entropies the weights need
        policy_pass = not torch.is_grad_enabled() and model is self.model and self.args.prepo_entropy_weighting
        batch_size = batch_size or input_ids.size(0)
        parts = [self._fused(model, input_ids[s : s + batch_size], attention_mask[s : s + batch_size],
                             logits_to_keep, temperature=self.temperature,
                             compute_entropy=compute_entropy or policy_pass)
                 for s in range(0, input_ids.size(0), batch_size)]
        logps, entropy = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
        if policy_pass:
            self._fused_passes.append((logps, entropy))
        return logps, entropy if compute_entropy else None, None

    # ---------------------------------------------------------------- fused loss
    def loss_params(self, mode: str) -> GRPOLossParams:
        """TRL's loss options as linear_grpo_loss's params; the entropy bonus's coefficient is the one
        TRL applies in this accumulation window (the adaptive controller's, gated by the last entropy)."""
        args = self.args
        coef = 0.0
        if self._entropy_bonus_enabled:
            coef = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > args.entropy_target:
                coef = 0.0
        return GRPOLossParams(
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            eps_low=self.epsilon_low, eps_high=self.epsilon_high, delta=args.delta, beta=self.beta,
            use_bias_correction_kl=args.use_bias_correction_kl, entropy_coef=coef,
            top_entropy_quantile=self.top_entropy_quantile, off_policy_mask_threshold=self.off_policy_mask_threshold,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg, max_completion_length=self.max_completion_length)

    def _compute_loss(self, model, inputs):
        """TRL's loss, every variant, as ``prepo_kernels.linear_grpo_loss`` on the decoder's hidden
        states (no [B, T, V] logits; one pass where each token's gradient is its own, two otherwise),
        with TRL's normalizers and TRL's metrics."""
        if not self.args.prepo_fused_logprobs:
            return super()._compute_loss(model, inputs)
        if self.aux_loss_enabled or self._is_vlm:
            raise ValueError("prepo_fused_logprobs supports text-only models without an MoE aux loss: set "
                             "prepo_fused_logprobs=False")
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # TRL's dapo / cispo / vespo normalizer: the generation batch's tokens, rescaled to one accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        n_keep = inputs["completion_ids"].shape[1]
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        is_ratio = None
        if (self.use_vllm and self.vllm_importance_sampling_correction) or self.loss_type == "vespo":
            is_ratio = inputs.get("importance_sampling_ratio")
        with self.accelerator.autocast():
            hidden, head = tail_hidden(model, self.accelerator.unwrap_model(model), input_ids, attention_mask)
            targets = torch.where(mask.bool(), next_token_targets(input_ids, attention_mask, n_keep), IGNORE)
            loss, stats = linear_grpo_loss(
                tail_of(hidden, head, n_keep), head.weight, targets, inputs.get("old_per_token_logps"), advantages,
                bias=head.bias, ignore_index=IGNORE, temperature=self.temperature, params=self.loss_params(mode),
                ref_logprob=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                importance_sampling_ratio=is_ratio, sampling_logprob=inputs.get("sampling_per_token_logps"),
                num_tokens=float(normalizer), accumulation_steps=float(accumulation),
                gather_entropies=self._gather_entropies, compute_entropy=True)
        entropy = self._fill_entropy(stats, hidden, head, input_ids, attention_mask, mask)
        self._log_loss_metrics(mode, accumulation, mask, advantages, stats.terms, entropy)
        return loss

    def _gather_entropies(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D entropies, as TRL's get_high_entropy_mask gathers them (a negative pad)."""
        pad = -1e9
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=pad))
        return gathered[gathered != pad]

    def _fill_entropy(self, stats, hidden, head, input_ids, attention_mask, mask) -> torch.Tensor:
        """[B, C] entropies of the completion tokens (``mask``): the fused loss's where it computed them,
        a no-grad forward of the LM head on the rows holding the rest (rows without a gradient, which
        the one-pass loss skips)."""
        entropy = stats.entropy
        rows = (mask.bool() & ~stats.computed).any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return entropy
        with torch.no_grad(), self.accelerator.autocast():
            _, rest = next_token_logprob_entropy(hidden[rows], head, input_ids[rows], attention_mask[rows],
                                                 entropy.shape[1], temperature=self.temperature)
        entropy = entropy.clone()
        entropy[rows] = torch.where(stats.computed[rows], entropy[rows], rest)
        return entropy

    def _log_loss_metrics(self, mode, accumulation, mask, advantages, terms, entropy) -> None:
        """TRL's _compute_loss metrics with TRL's definitions, and its adaptive entropy controller."""
        mask = mask.to(entropy.dtype)
        metrics = self._metrics[mode]

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self._entropy_bonus_enabled:  # TRL logs these losses before their division by the accumulation steps
            policy_loss = terms.policy_loss * (accumulation if self.loss_type not in ("dapo", "cispo", "vespo") else 1)
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            self._adapt_entropy_coef(mode, entropy, terms.effective_mask)
        if self.beta != 0.0:
            metrics["kl"].append(global_masked_mean(terms.per_token_kl))
        metrics["entropy"].append(global_masked_mean(entropy))
        coef_1 = terms.coef_1
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean((low.bool() | high.bool()).float()))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_masked_mean(((coef_1 > self.epsilon_high) & (advantages > 0))
                                                                  .float()))
        elif self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(terms.phi))

    def _adapt_entropy_coef(self, mode, entropy, effective_mask) -> None:
        """TRL's adaptive entropy controller (use_adaptive_entropy): the window's token-mean entropy
        over all ranks moves entropy_coef by entropy_coef_delta at each optimizer step."""
        args = self.args
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropy * effective_mask).sum(), effective_mask.sum()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else \
                self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
