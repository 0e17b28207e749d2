"""Run by tests/test_prepo_distributed.py under torchrun (1 or 2 processes): one update of the
trainer on a fixed global batch; rank 0 saves the parameters and the step's statistics.

usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_update_worker.py CONFIG_JSON OUT SKIP

SKIP: 1 = the update skips zero-advantage rollouts (the trainer's default), 0 = it runs them.
"""
import dataclasses
import json
import sys

import torch

from prepo.config import from_dict
from prepo.loss import group_advantages
from prepo.rollout import roll_out
from prepo.signals.weighting import relative_entropy_weights
from prepo.train import Trainer

cfg = from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg)
G = cfg.group_size
problems = trainer.data.train[: cfg.num_selected]
# the fixed global batch: every rank generates all of it alike (same seed, same weights) ...
torch.manual_seed(1234)
whole = roll_out(trainer.engine, trainer.reward_fn, problems, G)
rewards = whole.rewards
# ... and keeps its contiguous share of the groups, as the trainer shares the selected prompts
mine = trainer.dist.share(list(range(len(problems))))
rows = [g * G + j for g in mine for j in range(G)]
ro, mine_r = whole.rollouts.select(rows), rewards[rows]
# steps 4-5 of Trainer.step on that batch
old_lp, ent, ref_lp = trainer.old_logprobs(ro)
w = relative_entropy_weights(ent, ro.completion_mask, reduce=trainer.dist.sum)
update = trainer.update(ro, group_advantages(mine_r, G, cfg.adv_eps), w, old_lp, ref_lp,
                        skip_zero_adv=sys.argv[3] == "1")
batch = trainer.batch_stats(mine_r, ent, ro.completion_mask, w)
if trainer.dist.main:
    torch.save({"params": trainer.model.state_dict(), "batch": dataclasses.asdict(batch),
                "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
                "update": dataclasses.asdict(update), "rewards": rewards.tolist()}, sys.argv[2])
trainer.dist.close()
