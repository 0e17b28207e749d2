"""Vocab-parallel ``linear_grpo_loss(..., process_group=)``: 2 gloo ranks on CPU against the unsharded
op (impl="reference") in float64, for one-pass and two-pass variants: the loss (the same on every
rank), the hidden gradient summed over ranks (copy_to_vocab_parallel) and each rank's weight / bias
gradient shard. One spawn runs every case; each rank records None or the failure per case."""
from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prepo_kernels import GRPOLossParams, copy_to_vocab_parallel, linear_grpo_loss
from prepo_kernels.backends.registry import unavailable_reason

WORLD, F64 = 2, torch.float64
B, T, D, VS = 3, 5, 8, 13  # VS rows per shard
IMPLS = [impl for impl in ("torch", "cpu", "triton") if unavailable_reason(impl, "cpu") is None]
VARIANTS = {
    "dapo": GRPOLossParams(),
    "grpo-kl-entropy": GRPOLossParams(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, entropy_coef=0.05),
    "sequence-quantile": GRPOLossParams(loss_type="grpo", importance_sampling_level="sequence",
                                        top_entropy_quantile=0.5, entropy_coef=0.02),
    "vespo": GRPOLossParams(loss_type="vespo"),
}


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, dtype=F64, generator=gen)
    weight = torch.randn(WORLD * VS, D, dtype=F64, generator=gen)
    bias = torch.randn(WORLD * VS, dtype=F64, generator=gen)
    targets = torch.randint(0, WORLD * VS, (B, T), generator=gen)
    targets[torch.rand(B, T, generator=gen) < 0.2] = -100
    old = -3.0 + torch.randn(B, T, dtype=F64, generator=gen)
    ref = -3.0 + torch.randn(B, T, dtype=F64, generator=gen)
    adv = torch.randn(B, 1, dtype=F64, generator=gen)
    return hidden, weight, bias, targets, old, ref, adv


def _loss(hidden, weight, bias, targets, old, ref, adv, params, impl, group=None):
    return linear_grpo_loss(hidden, weight, targets, old, adv, bias=bias, ref_logprob=ref, params=params,
                            temperature=0.8, impl=impl, process_group=group)[0]


def _check(name, seed, impl, group, rank):
    hidden, weight, bias, targets, old, ref, adv = _inputs(seed)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = _loss(*leaves, targets, old, ref, adv, VARIANTS[name], "reference")
    want.backward()
    rows = slice(rank * VS, (rank + 1) * VS)
    h = hidden.clone().requires_grad_()
    w, b = weight[rows].clone().requires_grad_(), bias[rows].clone().requires_grad_()
    got = _loss(copy_to_vocab_parallel(h, group), w, b, targets, old, ref, adv, VARIANTS[name], impl, group)
    got.backward()
    for what, x, y in (("loss", got, want), ("d_hidden", h.grad, leaves[0].grad),
                       ("d_weight", w.grad, leaves[1].grad[rows]), ("d_bias", b.grad, leaves[2].grad[rows])):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12), f"{what}: max err {(x - y).abs().max():.3g}"


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    results = {}
    try:
        for impl in IMPLS:
            for seed, name in enumerate(VARIANTS):
                try:
                    _check(name, seed, impl, group, rank)
                    results[f"{impl}:{name}"] = None
                except Exception:  # reported by the test for this key
                    results[f"{impl}:{name}"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_vocab_parallel")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_unsharded_float64(results, impl, name):
    failures = [f"rank {r}:\n{res.get(f'{impl}:{name}', 'not run')}" for r, res in enumerate(results)
                if res.get(f"{impl}:{name}", "not run") is not None]
    assert not failures, "\n".join(failures)
