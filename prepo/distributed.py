"""Data parallelism on torch.distributed: ``torchrun --nproc_per_node N -m prepo.train ...``.

Every rank holds the whole policy and draws the same candidate batch and curriculum window (the
sampler and the selection RNG are seeded alike); each rank scores and rolls out its contiguous
share of the prompts; the gradients are summed across ranks after the backward pass (gloo on the
CPU, nccl on CUDA), with each rank's loss divided by the mini-batch's GLOBAL completion-token count,
so the update equals one process's update on the global batch. Rank 0 alone writes metrics,
evaluates and saves checkpoints. With one process every method here is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); joins the process group
        (nccl for ``device_type`` cuda, else gloo) when there is more than one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        d = cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if not tdist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(d.local_rank)
            tdist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return d

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()

    def share(self, items: Sequence) -> list:
        """This rank's contiguous share of ``items`` (sizes differ by at most one; rank order)."""
        bounds = np.linspace(0, len(items), self.world + 1).round().astype(int) if self.active else (0, len(items))
        return list(items[bounds[self.rank] : bounds[self.rank + 1]])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (a new tensor on the all-reduce; ``t`` itself with one process)."""
        if not self.active:
            return t
        t = t.clone()
        tdist.all_reduce(t)
        return t

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (for ranks' shares: the global list)."""
        if not self.active:
            return items
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def sum_grads(self, params) -> None:
        """Give every trainable parameter a ``.grad`` (zeros where no backward reached it: a rank
        whose share of a mini-batch was empty, or had only rollouts the update skips), summed over
        ranks. The optimizer then steps every parameter alike, as if those rows had added their
        zero gradients."""
        for p in params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if self.active:
                    tdist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()
