"""PREPOSampler built by verl's own v1 trainer code (``_build_replay_buffer`` reading the documented
``trainer.v1.sampler.custom_sampler`` / ``sampler_kwargs`` overrides) and sampling from a real
TransferQueue: the trainer's refill stands in for the rollout, putting finished prompt groups with
their trajectories (a ``ppl`` field, as verl's dataset carries a ``prepo score`` column) the way
verl's agent loop does."""
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transfer_queue as tq
from hydra import compose, initialize_config_module

from prepo.integrations.verl import PREPOSampler
from prepo.signals.pacing import pacing_rho, window_select
from test_verl_trainer import ray_tq  # noqa: F401  (the module-scoped Ray + TransferQueue fixture)
from verl.trainer.ppo.v1 import PPOTrainerSync
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

ROLLOUT_N, BATCH = 2, 4
SAMPLER = ["trainer.v1.sampler.custom_sampler.path=pkg://prepo.integrations.verl",
           "trainer.v1.sampler.custom_sampler.name=PREPOSampler"]


def config(*overrides):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=[*SAMPLER, *overrides])


class FakeRollout:
    """The trainer side: each submitted prompt is rolled out at once (status finished) with
    ROLLOUT_N trajectories whose fields carry the prompt's ppl; the ppl values come from ``rng``."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.ppl: dict[str, float] = {}
        self.step = 1

    def submit(self, n: int) -> int:
        uids = [uuid.uuid4().hex for _ in range(n)]
        tq.kv_batch_put(keys=uids, partition_id="train",
                        tags=[{"is_prompt": True, "status": "finished", "global_steps": self.step}] * n)
        keys, rows = [], []
        for uid in uids:
            self.ppl[uid] = float(self.rng.uniform(1.5, 40.0))
            for s in range(ROLLOUT_N):
                keys.append(f"{uid}_{s}_0")
                rows.append({"ppl": self.ppl[uid], "data_source": "wm", "response_mask": torch.ones(3, dtype=torch.int64)})
        tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows),
                        tags=[{"status": "success", "global_steps": self.step}] * len(keys))
        return n


def build(cfg, rollout):
    """The replay buffer exactly as verl's v1 trainer builds it (its own method, on a stand-in self)."""
    trainer = SimpleNamespace(config=cfg, trainer_mode="sync", _add_prompts_to_generate=rollout.submit)
    return PPOTrainerSync._build_replay_buffer(trainer)


def clear_train():
    keys = list((tq.kv_list("train") or {}).get("train", {}))
    if keys:
        tq.kv_clear(keys=keys, partition_id="train")


@pytest.mark.parametrize("direction", ["low_to_high", "high_to_low"])
def test_sampler_walks_the_window_over_the_candidates(ray_tq, direction):  # noqa: F811
    cfg = config("+trainer.v1.sampler.sampler_kwargs.total_steps=5",
                 "+trainer.v1.sampler.sampler_kwargs.candidate_multiple=3",
                 f"+trainer.v1.sampler.sampler_kwargs.direction={direction}")
    rollout = FakeRollout()
    sampler = build(cfg, rollout)
    assert isinstance(sampler, PREPOSampler) and sampler.prepo.candidate_multiple == 3
    for step in (1, 3, 5):
        clear_train()
        rollout.step = step
        rollout.submit(BATCH)                         # what the trainer's prepare_step submitted
        batch, metrics = sampler.sample(global_steps=step, partition_id="train", batch_size=BATCH)
        cands = sorted(list(rollout.ppl)[-3 * BATCH:])   # this step's 12 candidates (refill added 8)
        ppl = np.array([rollout.ppl[u] for u in cands])
        rho = pacing_rho(step - 1, 5)
        want = {cands[i] for i in window_select(ppl, BATCH, rho if direction == "low_to_high" else 1 - rho)}
        got = {k.split("_")[0] for k in batch.keys}
        assert got == want and len(batch.keys) == BATCH * ROLLOUT_N
        assert metrics["prepo/rho"] == pytest.approx(rho) and metrics["prepo/candidates"] == 3 * BATCH
        left = set((tq.kv_list("train") or {}).get("train", {}))
        assert {k.split("_")[0] for k in left} == want   # the other candidates' groups were cleared
    first = sorted(window_select(np.arange(12.0), BATCH, 0.0 if direction == "low_to_high" else 1.0).tolist())
    assert first == ([0, 1, 2, 3] if direction == "low_to_high" else [8, 9, 10, 11])
    clear_train()


def test_bad_settings_and_a_missing_ppl_column(ray_tq):  # noqa: F811
    rollout = FakeRollout(1)
    with pytest.raises(ValueError, match="needs sampler_kwargs.total_steps"):
        build(config(), rollout)
    with pytest.raises(ValueError, match="unknown sampler_kwargs"):
        build(config("+trainer.v1.sampler.sampler_kwargs.total_steps=5", "+trainer.v1.sampler.sampler_kwargs.k=1"), rollout)
    with pytest.raises(ValueError, match="pacing"):
        build(config("+trainer.v1.sampler.sampler_kwargs.total_steps=5",
                     "+trainer.v1.sampler.sampler_kwargs.pacing=cubic"), rollout)
    sampler = build(config("+trainer.v1.sampler.sampler_kwargs.total_steps=5",
                           "+trainer.v1.sampler.sampler_kwargs.ppl_field=score"), rollout)
    clear_train()
    rollout.submit(BATCH)
    with pytest.raises(KeyError, match="python -m prepo.score"):
        sampler.sample(global_steps=1, partition_id="train", batch_size=BATCH)
    clear_train()
