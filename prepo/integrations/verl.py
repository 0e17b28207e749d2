"""PREPO for verl 0.9.x: a v1 trainer registered as ``trainer.v1.trainer_mode=prepo``.

verl 0.9's default ("v1") trainer, ``verl.trainer.ppo.v1.PPOTrainer``, lets a subclass be
registered by name and override its steps; this module registers :class:`PREPOTrainer`, a
:class:`~verl.trainer.ppo.v1.PPOTrainerSync` that changes two of them:

* ``_next_train_batch`` (batch fetching): draws ``candidate_multiple`` times the prompts verl asks
  for, scores their perplexity under the current policy with one extra log-prob pass through the
  actor worker group (the same ``compute_log_prob`` call as the old-log-prob step, on the
  candidate prompts placed in their own TransferQueue partition), and hands on only the window
  at ``rho = pacing((step - 1) / total_steps)``: only those prompts are rolled out.
* ``_compute_advantage``: after verl computes the advantages, multiplies each response's by
  ``w_i = H_i / H_bar`` from the per-token entropies the old-log-prob pass already stored.

Options (``trainer.prepo.*``, read by :meth:`VerlPrepoParams.from_config`): ``candidate_multiple``
(5), ``pacing`` (linear | quadratic | exponential), ``curriculum`` (true), ``weighting`` (true),
``ppl_scope`` (problem | user | prompt: what the perplexity averages, :mod:`prepo.prompts`; the
last user message's text by default).

For trainers that keep verl's own trainer mode, :class:`~prepo.integrations.verl_sampler.PREPOSampler`
(``trainer.v1.sampler.custom_sampler.path=pkg://prepo.integrations.verl``, ``.name=PREPOSampler``)
walks the window over a ``ppl`` column written by ``python -m prepo.score``.

verl builds the trainer inside a Ray actor, so the registry there must hold this class: pass
``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=prepo.integrations.verl.register``
(Ray imports this module in every worker process). Requires verl >= 0.9, < 0.10 (see
:data:`SUPPORTED_VERL`): 0.6-0.7's ``AbstractCurriculumSampler`` has no policy, and 0.8 has
neither that sampler nor the v1 trainer registry.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from packaging.version import Version

try:
    import verl  # first, so that without verl the message names it
    import transfer_queue as tq  # verl 0.9's v1 trainer stores batches there
    from omegaconf import open_dict
    from tensordict import TensorDict
except ImportError as exc:  # not in this environment: say which extra brings them
    raise ImportError(f"prepo.integrations.verl needs verl and its v1 trainer's dependencies ({exc.name} is "
                      "missing): pip install 'prepo[verl]', in an environment of its own (verl pins "
                      "transformers < 5.11; see .ci/run_verl)") from exc

from prepo.config import PPL_SCOPES
from prepo.signals.pacing import PACINGS, pacing_rho

SUPPORTED_VERL = (Version("0.9"), Version("0.10"))
TRAINER_NAME = "prepo"
SCORE_PARTITION = "prepo_score"


def check_verl_version(version: str = verl.__version__) -> None:
    """Raise if ``version`` lies outside [0.9, 0.10): the extension points used here are 0.9's."""
    if not SUPPORTED_VERL[0] <= Version(version) < SUPPORTED_VERL[1]:
        raise ImportError(f"prepo.integrations.verl supports verl >= {SUPPORTED_VERL[0]}, < {SUPPORTED_VERL[1]} "
                          f"(the v1 trainer registry); verl {version} is installed")


check_verl_version()  # before importing verl.trainer.ppo.v1, which older releases lack

from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer  # noqa: E402
from verl.workers.utils.padding import response_from_nested, response_to_nested  # noqa: E402

from .verl_sampler import PREPOSampler, SamplerParams  # noqa: E402,F401  (custom_sampler: pkg://prepo.integrations.verl)
from .verl_ops import (chat_prompt_spans, perplexity_from_response_log_probs, prompt_scoring_fields,  # noqa: E402
                       select_window, weight_advantages)


@dataclass(frozen=True)
class VerlPrepoParams:
    candidate_multiple: int = 5
    pacing: str = "linear"
    curriculum: bool = True
    weighting: bool = True
    ppl_scope: str = "problem"

    def __post_init__(self):
        if not (isinstance(self.candidate_multiple, int) and self.candidate_multiple >= 1):
            raise ValueError(f"trainer.prepo.candidate_multiple must be an int >= 1, got {self.candidate_multiple!r}")
        if self.pacing not in PACINGS:
            raise ValueError(f"trainer.prepo.pacing must be one of {PACINGS}, got {self.pacing!r}")
        if self.ppl_scope not in PPL_SCOPES:
            raise ValueError(f"trainer.prepo.ppl_scope must be one of {PPL_SCOPES}, got {self.ppl_scope!r}")

    @classmethod
    def from_config(cls, config) -> "VerlPrepoParams":
        """From ``config.trainer.prepo`` (absent: the defaults); unknown keys are an error."""
        section = dict(config.trainer.get("prepo") or {})
        unknown = set(section) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown trainer.prepo options {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**section)


def check_trainer_config(config, params: VerlPrepoParams) -> None:
    """Reject verl settings this trainer does not support with ``params``, naming them."""
    if config.algorithm.get("filter_groups") is not None and config.algorithm.filter_groups.get("enable", False):
        raise ValueError("PREPOTrainer does not support algorithm.filter_groups (DAPO dynamic sampling): "
                         "its refills would bypass the perplexity window")
    if config.trainer.v1.sampler.get("sync_refill_failed_groups", False):
        raise ValueError("PREPOTrainer does not support trainer.v1.sampler.sync_refill_failed_groups")
    rollout_corr = config.algorithm.get("rollout_correction") or {}
    if rollout_corr.get("bypass_mode", False) and params.weighting:
        raise ValueError("trainer.prepo.weighting needs the old-log-prob pass's entropies, which "
                         "algorithm.rollout_correction.bypass_mode=True skips")


@register_trainer(TRAINER_NAME)
class PREPOTrainer(PPOTrainerSync):
    """The synchronous v1 trainer plus PREPO's perplexity window and entropy-weighted advantages."""

    def __init__(self, config):
        self.prepo = VerlPrepoParams.from_config(config)
        check_trainer_config(config, self.prepo)
        # the registry looked this class up by trainer_mode; the base class reads trainer_mode as
        # "sync vs async" behaviour, and this trainer is the sync one
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    def _next_train_batch(self, num_prompts: int | None = None) -> TensorDict:
        num_prompts = num_prompts or self.config.data.train_batch_size
        if not self.prepo.curriculum:
            return super()._next_train_batch(num_prompts)
        candidates = super()._next_train_batch(num_prompts * self.prepo.candidate_multiple)
        ppl = self._prompt_perplexity(candidates)
        rho = pacing_rho(self.global_steps - 1, self.total_training_steps, self.prepo.pacing)
        selected, idx = select_window(candidates, ppl, rho, num_prompts)
        self._prepo_metrics = {"prepo/rho": rho, "prepo/candidate_ppl_mean": ppl.mean().item(),
                               "prepo/window_ppl_mean": ppl[idx].mean().item()}
        return selected

    def step(self, metrics: dict, timing_raw: dict):
        batch = super().step(metrics, timing_raw)  # fetches the prompts through _next_train_batch
        metrics.update(self._prepo_metrics if self.prepo.curriculum else {})
        return batch

    def _actor_dp_size(self) -> int:
        wg = self.actor_rollout_wg
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        return max(wg._dispatch_info["actor"]) + 1

    def _prompt_perplexity(self, candidates: TensorDict) -> torch.Tensor:
        """[len(candidates)] perplexities under the current actor (of the ``ppl_scope`` span): one
        ``compute_log_prob`` pass."""
        spans = chat_prompt_spans(self.tokenizer, list(candidates["raw_prompt"]),
                                  self.config.data.get("apply_chat_template_kwargs"), self.prepo.ppl_scope)
        n = len(spans)
        spans += [spans[-1]] * (-n % self._actor_dp_size())  # the dispatcher splits the batch evenly over dp ranks
        keys = [f"prepo_score_{self.global_steps}_{i}" for i in range(len(spans))]
        meta = tq.kv_batch_put(keys=keys, partition_id=SCORE_PARTITION, fields=prompt_scoring_fields(spans),
                               tags=[{"status": "success"} for _ in keys])
        meta.extra_info.update({"calculate_entropy": False, "compute_loss": False, "temperature": 1.0})
        try:
            self.actor_rollout_wg.compute_log_prob(meta)
            data = tq.kv_batch_get(keys=keys, partition_id=SCORE_PARTITION, select_fields=["log_probs", "response_mask"])
            log_probs = response_from_nested(data["log_probs"], data["response_mask"])
        finally:
            tq.kv_clear(keys=keys, partition_id=SCORE_PARTITION)
        return perplexity_from_response_log_probs(log_probs)[:n]

    def _compute_advantage(self, batch, metrics: dict):
        batch = super()._compute_advantage(batch, metrics)
        if not self.prepo.weighting:
            return batch
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["advantages", "entropy", "response_mask"])
        response_mask = data["response_mask"]
        padded = DataProto(batch=data.to_padded_tensor())
        w = weight_advantages(padded)
        metrics.update({"prepo/entropy_weight_min": w.min().item(), "prepo/entropy_weight_max": w.max().item()})
        advantages = response_to_nested(padded.batch["advantages"], response_mask)
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                               fields=TensorDict({"advantages": advantages}, batch_size=len(batch)))


def register() -> None:
    """Ray ``worker_process_setup_hook``: Ray imports this module in each worker process, and
    the import registers :class:`PREPOTrainer`; nothing is left to do."""
