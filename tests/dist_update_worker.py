"""Run by tests/test_prepo_distributed.py under torchrun (1 or 2 processes): one update of the
trainer on a fixed global batch; rank 0 saves the parameters and the step's statistics.

usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_update_worker.py CONFIG_JSON OUT
"""
import dataclasses
import json
import sys

import torch

from prepo.config import from_dict
from prepo.curriculum import Collected
from prepo.metrics import Timer
from prepo.train import Trainer

cfg = from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg)
G = cfg.group_size
problems = trainer.data.train[: cfg.num_selected]
# the fixed global batch: every rank generates all of it alike (same seed, same weights) ...
torch.manual_seed(1234)
ro, rewards, _ = trainer.roll_out(problems, Timer())
# ... and keeps its contiguous share of the groups, as the trainer shares the selected prompts
mine = trainer.dist.share(list(range(len(problems))))
rows = [g * G + j for g in mine for j in range(G)]
got = Collected([problems[g] for g in mine], ro.select(rows), rewards[rows], 0)
batch, update = trainer.learn(got, Timer())
if trainer.dist.main:
    torch.save({"params": trainer.model.state_dict(), "batch": dataclasses.asdict(batch),
                "update": dataclasses.asdict(update), "rewards": rewards.tolist()}, sys.argv[2])
trainer.dist.close()
