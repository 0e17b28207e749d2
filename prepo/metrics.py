"""The run's bookkeeping: its counters, the step timer, and one step's metrics as one typed
record: the trainer fills it, and metrics.jsonl, TensorBoard, the summary and
``benchmarks/rollout_efficiency.py`` read it (one JSON object a line, the field names as keys;
optional groups appear only when they apply)."""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

TIME_KEYS = ("time_score", "time_select", "time_generate", "time_reward", "time_old_logprob", "time_weight",
             "time_update", "time_sync")   # time_sync: the rollout engine takes the new weights (vLLM; 0 for HF)
PREPO_OVERHEAD_KEYS = ("time_score", "time_select", "time_weight")   # what PREPO adds to a GRPO step


@dataclass
class RunCounters:
    """The run's running totals over all ranks (saved in its checkpoints)."""

    steps: int = 0
    rollouts: int = 0           # every training completion generated
    reward_failures: int = 0    # reward calls that raised (those rewards count as 0)

    def add_step(self, rollouts: int, reward_failures: int) -> None:
        self.steps += 1
        self.rollouts += rollouts
        self.reward_failures += reward_failures

    def state_dict(self) -> dict:
        return {"step": self.steps, "rollouts": self.rollouts, "reward_failures": self.reward_failures}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.rollouts, self.reward_failures = state["step"], state["rollouts"], state["reward_failures"]


class Timer:
    """Seconds spent per phase of a step (``with timer("time_generate"): ...``), summed."""

    def __init__(self):
        self.t: dict[str, float] = {k: 0.0 for k in TIME_KEYS}

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0


@dataclass
class UpdateStats:
    """Means over the optimizer steps of one update, and the rollouts it skipped (a count)."""

    loss: float = 0.0
    clip_frac: float = 0.0
    kl: float = 0.0
    ratio_mean: float = 1.0            # over the updated tokens
    grad_norm: float = 0.0
    skipped_rollouts: int = 0          # zero-advantage rollouts left out of the forward / backward (all ranks)


@dataclass
class BatchStats:
    """The rolled-out batch: rewards, entropies, relative-entropy weights (defaults: nothing kept)."""

    reward_mean: float = 0.0
    zero_adv_frac: float = 1.0
    entropy_mean: float = 0.0
    weight_min: float = 1.0
    weight_max: float = 1.0
    weight_p10: float = 1.0
    weight_p90: float = 1.0
    completion_len: float = 0.0


@dataclass
class StepMetrics:
    step: int
    rollouts: int                      # cumulative, every generated completion (all ranks)
    step_rollouts: int
    rho: float
    weight_applied: bool
    reward_failures: int               # cumulative
    batch: BatchStats = field(default_factory=BatchStats)
    update: UpdateStats = field(default_factory=UpdateStats)
    ppl_window_lo: Optional[float] = None
    ppl_window_hi: Optional[float] = None
    ppl_batch_mean: Optional[float] = None
    selected_difficulty: Optional[float] = None
    dynamic: Optional[dict] = None     # dapo_dynamic: dynamic_rounds, dynamic_groups_generated/_kept
    selection: Optional[dict] = None   # greso: greso_skipped, greso_backfilled, greso_p_easy, greso_p_hard
    premise: Optional[dict] = None     # scoring strategies: premise_spearman, _pvalue, _prompts, _direction
    times: dict = field(default_factory=dict)   # TIME_KEYS + time_step, seconds
    eval: Optional[dict] = None        # on evaluation steps: eval_accuracy, time_eval[, eval_avg@k]
    picked: Optional[dict] = None      # the prompts the step rolled out: its selection.jsonl row, not in metrics.jsonl
    engine: Optional[dict] = None      # vLLM, on checked weight syncs: vllm_logprob_gap (nats, max over the probe tokens)

    @property
    def reward_mean(self) -> float:
        return self.batch.reward_mean

    def to_dict(self) -> dict:
        """The flat metrics.jsonl row."""
        d = {"step": self.step}
        d.update(dataclasses.asdict(self.batch))
        d["weight_applied"] = self.weight_applied
        d.update(dataclasses.asdict(self.update))
        d.update(rollouts=self.rollouts, step_rollouts=self.step_rollouts, rho=self.rho,
                 ppl_window_lo=self.ppl_window_lo, ppl_window_hi=self.ppl_window_hi,
                 ppl_batch_mean=self.ppl_batch_mean, selected_difficulty=self.selected_difficulty,
                 reward_failures=self.reward_failures)
        d.update(self.dynamic or {})
        d.update(self.selection or {})
        d.update(self.premise or {})
        d.update(self.times)
        d.update(self.eval or {})
        d.update(self.engine or {})
        return d

    def scalars(self) -> dict[str, float]:
        """The numeric fields (TensorBoard)."""
        return {k: v for k, v in self.to_dict().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}

    @classmethod
    def from_dict(cls, d: dict) -> "StepMetrics":
        """A metrics.jsonl row back as a record."""
        names = lambda c: {f.name for f in dataclasses.fields(c)}  # noqa: E731
        top = names(cls) - {"batch", "update", "dynamic", "selection", "premise", "times", "eval", "picked", "engine"}
        return cls(
            **{k: d.get(k) for k in top},
            batch=BatchStats(**{k: d[k] for k in names(BatchStats) if k in d}),
            update=UpdateStats(**{k: d[k] for k in names(UpdateStats) if k in d}),
            dynamic={k: v for k, v in d.items() if k.startswith("dynamic_")} or None,
            selection={k: v for k, v in d.items() if k.startswith("greso_")} or None,
            premise={k: v for k, v in d.items() if k.startswith("premise_")} or None,
            times={k: v for k, v in d.items() if k.startswith("time_") and k != "time_eval"},
            eval={k: v for k, v in d.items() if k.startswith("eval_") or k == "time_eval"} or None,
            engine={k: v for k, v in d.items() if k.startswith("vllm_")} or None,
        )


def step_times(timer: Timer, seconds: float) -> dict:
    """The timing fields of a step: each phase, the step, and PREPO's overhead share."""
    t = {k: round(v, 6) for k, v in timer.t.items()}
    t["time_step"] = round(seconds, 6)
    t["time_prepo_overhead_frac"] = round(sum(timer.t[k] for k in PREPO_OVERHEAD_KEYS) / seconds, 6)
    return t


def batch_stats(rewards: torch.Tensor, ent: torch.Tensor, cmask: torch.Tensor, w: torch.Tensor, group_size: int,
                dist) -> BatchStats:
    """Rewards [N], entropies [N, C], completion mask [N, C] and weights [N] of this rank's
    rollouts, summarized over the global batch (all ranks' rollouts; ``dist``: a
    :class:`~prepo.distributed.Dist`)."""
    if dist.active:
        rewards, w = torch.tensor(dist.gather(rewards.tolist())), torch.tensor(dist.gather(w.tolist()))
    totals = dist.sum(torch.stack([(ent * cmask).sum(), cmask.sum().to(ent.dtype)]))
    n_tok = totals[1].item()
    return BatchStats(
        reward_mean=float(rewards.mean()),
        zero_adv_frac=float((rewards.view(-1, group_size).std(dim=1) == 0).float().mean()),
        entropy_mean=float(totals[0] / max(n_tok, 1)),
        weight_min=float(w.min()), weight_max=float(w.max()),
        weight_p10=float(w.quantile(0.1)), weight_p90=float(w.quantile(0.9)),
        completion_len=n_tok / w.numel())
