"""PREPO's curriculum as a custom sampler of verl 0.9's v1 trainer (``trainer.v1.sampler.custom_sampler``).

verl's v1 trainers draw their training batch from a replay buffer over TransferQueue, and a
``ReplayBuffer`` subclass named in the config replaces it. :class:`PREPOSampler` is one for the
synchronous trainer: each step it asks the trainer for ``candidate_multiple - 1`` more batches of
prompts (its ``refill_fn``; the trainer already submitted one), waits until every candidate group
has finished, and hands on the ``batch_size`` groups of the perplexity window at
``rho = pacing((step - 1) / total_steps)``, the rest cleared. The perplexity is each prompt's
``ppl`` column, written by ``python -m prepo.score`` (any numeric column: ``ppl_field``), which
verl's dataset carries into every trajectory.

Every candidate is rolled out here, as in DAPO's over-sampling: the sampler brings the curriculum
order to any sync v1 trainer, not PREPO's rollout saving. ``trainer.v1.trainer_mode=prepo``
(:class:`prepo.integrations.verl.PREPOTrainer`) scores the candidates online with the actor and
rolls out only the window.

Options (``trainer.v1.sampler.sampler_kwargs``, :class:`SamplerParams`): ``total_steps``
(required: the run's training steps), ``candidate_multiple`` (4), ``pacing`` (linear), ``direction``
(low_to_high | high_to_low), ``ppl_field`` (ppl).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from prepo.signals.pacing import PACINGS, pacing_rho, window_select

DIRECTIONS = ("low_to_high", "high_to_low")


@dataclass(frozen=True)
class SamplerParams:
    total_steps: int
    candidate_multiple: int = 4
    pacing: str = "linear"
    direction: str = "low_to_high"
    ppl_field: str = "ppl"

    def __post_init__(self):
        for name in ("total_steps", "candidate_multiple"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"sampler_kwargs.{name} must be an int >= 1, got {value!r}")
        if self.pacing not in PACINGS:
            raise ValueError(f"sampler_kwargs.pacing must be one of {PACINGS}, got {self.pacing!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"sampler_kwargs.direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @classmethod
    def from_kwargs(cls, kwargs) -> "SamplerParams":
        """From ``trainer.v1.sampler.sampler_kwargs``; unknown keys and a missing total_steps are errors."""
        kwargs = dict(kwargs or {})
        known = {f.name for f in fields(cls)}
        if set(kwargs) - known:
            raise ValueError(f"unknown sampler_kwargs {sorted(set(kwargs) - known)} for PREPOSampler; known: {sorted(known)}")
        if "total_steps" not in kwargs:
            raise ValueError("PREPOSampler needs sampler_kwargs.total_steps (the run's training steps: the window's pace)")
        return cls(**kwargs)


class PREPOSampler(ReplayBuffer):
    """The synchronous replay buffer with PREPO's perplexity window over over-sampled candidates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepo = SamplerParams.from_kwargs(self.sampler_kwargs)
        if self.trainer_mode != "sync":
            raise ValueError(f"PREPOSampler runs with the sync v1 trainer, not trainer_mode {self.trainer_mode!r}")
        if self.prepo.candidate_multiple > 1 and self.refill_fn is None:
            raise ValueError("PREPOSampler needs the trainer's refill_fn to over-sample candidates")
        self._window: tuple[int, int] | None = None   # (global step, window size) while a train batch is drawn
        self._refilled_step: int | None = None
        self._metrics: dict = {}

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        """verl's interface: (the batch's KVBatchMeta, metrics). Validation batches pass through."""
        if partition_id != "train":
            return super().sample(global_steps, partition_id, batch_size)
        extra = (self.prepo.candidate_multiple - 1) * batch_size
        if extra and self._refilled_step != global_steps:   # once per step, also if a poll is retried
            self.refill_fn(extra)
            self._refilled_step = global_steps
        self._window = (global_steps, batch_size)
        try:
            batch, metrics = super().sample(global_steps, partition_id, batch_size * self.prepo.candidate_multiple)
        finally:
            self._window = None
        metrics.update(self._metrics)
        return batch, metrics

    def _select_prompt_uids(self, partition_id: str, sampleable_keys: set[str], batch_size: int):
        """The window of the finished candidate groups (the base class's hook); the others are cleared."""
        if self._window is None:
            return super()._select_prompt_uids(partition_id, sampleable_keys, batch_size)
        step, k = self._window
        uids = sorted(sampleable_keys)
        ppl = self.prompt_ppl(partition_id, uids)
        rho = pacing_rho(step - 1, self.prepo.total_steps, self.prepo.pacing)
        idx = window_select(ppl, k, rho if self.prepo.direction == "low_to_high" else 1.0 - rho)
        selected = [uids[i] for i in idx]
        partition_snapshot = dict(self.partitions[partition_id])
        steps_snapshot = dict(self.prompt_global_steps[partition_id])
        self._clear_groups(partition_id, set(uids) - set(selected))
        self._metrics = {"prepo/rho": rho, "prepo/candidate_ppl_mean": float(ppl.mean()),
                         "prepo/window_ppl_mean": float(ppl[idx].mean()), "prepo/candidates": len(uids)}
        return selected, partition_snapshot, steps_snapshot

    def prompt_ppl(self, partition_id: str, uids: list[str]) -> np.ndarray:
        """[len(uids)] float64: the ``ppl_field`` of one trajectory of each prompt group."""
        first = {}
        for key in self.partitions[partition_id]:
            first.setdefault(key.split("_")[0], key)
        missing = [u for u in uids if u not in first]
        if missing:
            raise RuntimeError(f"PREPOSampler: prompt groups {missing[:3]} have no trajectory to read "
                               f"{self.prepo.ppl_field!r} from")
        data = tq.kv_batch_get(keys=[first[u] for u in uids], partition_id=partition_id,
                               select_fields=[self.prepo.ppl_field])
        if self.prepo.ppl_field not in data.keys():
            raise KeyError(f"the trajectories have no {self.prepo.ppl_field!r} field: score the training data with "
                           "`python -m prepo.score` (it adds a `ppl` column) or name the column in sampler_kwargs.ppl_field")
        # a dataset column of floats arrives as a list (verl stores it as non-tensor data); a tensor also passes
        try:
            ppl = np.asarray([float(v) for v in data[self.prepo.ppl_field]], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{self.prepo.ppl_field!r} must hold one number per prompt") from None
        if ppl.shape != (len(uids),) or not np.isfinite(ppl).all():
            raise ValueError(f"{self.prepo.ppl_field!r} must be one finite number per prompt, got {ppl.tolist()[:5]}...")
        return ppl
