"""Run by tests/test_prepo_distributed.py under torchrun (1 or 2 processes): one update of the
trainer's learner on a fixed global batch; rank 0 saves the parameters and the step's statistics.

usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_update_worker.py CONFIG_JSON OUT SKIP

SKIP: 1 = the update skips zero-advantage rollouts (the learner as the trainer builds it; with
mini_batches 1 on-policy: no old-log-prob pass on the rollouts it updates), 0 = a learner that runs
every rollout forward and backward after the old-log-prob pass over every rollout.
"""
import dataclasses
import json
import sys

import torch

from prepo.builder import build_run
from prepo.config import from_dict
from prepo.learner import Learner
from prepo.loss import group_advantages
from prepo.metrics import Timer, batch_stats
from prepo.rollout import roll_out


class EveryRow(Learner):
    """Runs the zero-advantage rollouts too (their gradient is 0: the update must not change), after
    the old-log-prob pass over every rollout."""

    on_policy = False

    def rows_with_gradient(self, adv):
        return torch.ones(adv.shape[0], dtype=torch.bool)


cfg = from_dict(json.loads(sys.argv[1]))
parts = build_run(cfg)
learner = parts.learner if sys.argv[3] == "1" else EveryRow(cfg, parts.model, None, parts.precision, parts.dist)
dist, G = parts.dist, cfg.group_size
problems = parts.data.train[: cfg.num_selected]
# the fixed global batch: every rank generates all of it alike (same seed, same weights) ...
torch.manual_seed(1234)
whole = roll_out(parts.engine, parts.reward_fn, problems, G)
rewards = whole.rewards
# ... and keeps its contiguous share of the groups, as the trainer shares the selected prompts
mine = dist.share(list(range(len(problems))))
rows = [g * G + j for g in mine for j in range(G)]
ro, mine_r = whole.rollouts.select(rows), rewards[rows]
# steps 4-5 of Trainer.step on that batch
learned = learner.learn(ro, group_advantages(mine_r, G, cfg.adv_eps), True, Timer())
update = learned.update
batch = batch_stats(mine_r, learned.entropy, ro.completion_mask, learned.weights, G, dist)
if dist.main:
    torch.save({"params": parts.model.state_dict(), "batch": dataclasses.asdict(batch),
                "grads": {n: p.grad.clone() for n, p in parts.model.named_parameters()},
                "update": dataclasses.asdict(update), "rewards": rewards.tolist()}, sys.argv[2])
dist.close()
