"""Vocab-parallel ``linear_logprob_entropy(..., process_group=)``: 2 gloo ranks on CPU against the
unsharded op (impl="reference") in float64 -- values, the hidden gradient (summed over ranks), this
rank's weight and bias gradient shards -- plus inputs that must be refused on every rank.

One spawn of 2 processes runs every case; each rank records per case None or the failure, and the
parametrized tests below read those records.
"""
from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass
from typing import Optional, Union

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prepo_kernels import copy_to_vocab_parallel, linear_logprob_entropy, vocab_parallel
from prepo_kernels.backends.registry import unavailable_reason

WORLD = 2
F64 = torch.float64
# the fused backends that run on CPU tensors here (triton through its interpreter: conftest.py sets
# TRITON_INTERPRET=1 when there is no CUDA device)
IMPLS = [impl for impl in ("torch", "cpu", "triton") if unavailable_reason(impl, "cpu") is None]


@dataclass(frozen=True)
class Case:
    lead: tuple  # leading dims of hidden / targets
    vs: int  # rows per shard; the global vocab is WORLD * vs
    d: int = 8
    bias: bool = True
    temperature: Union[float, str] = 0.7  # "token": a random per-token temperature tensor
    ignore_frac: float = 0.25
    compute_entropy: bool = True
    zero_frac: float = 0.3  # rows whose upstream gradients (g and e) are both zero
    g_zero: bool = False  # g == 0 everywhere: only the entropy gradient flows
    scale: float = 3.0  # weight scale: logits of order scale * |h|
    reduce: str = "helper"  # how dh is summed over ranks: copy_to_vocab_parallel, or a "manual" all_reduce


CASES = {
    "scalar_temperature_bias_entropy": Case(lead=(3, 5), vs=23),
    "per_token_temperature_no_entropy": Case(lead=(4, 3), vs=17, d=6, bias=False, temperature="token",
                                             compute_entropy=False, reduce="manual"),
    "per_token_temperature_entropy": Case(lead=(7,), vs=9, temperature="token", reduce="manual"),
    "vocab_not_a_tile_multiple": Case(lead=(6,), vs=8195, temperature=1.3),  # torch tile 8192 + 3 columns
    "large_logits": Case(lead=(5,), vs=11, scale=60.0, temperature=0.5, zero_frac=0.0),
    "one_token": Case(lead=(1,), vs=5, ignore_frac=0.0, zero_frac=0.0),
    "entropy_gradient_only": Case(lead=(9,), vs=13, g_zero=True),
    "every_target_ignored": Case(lead=(4,), vs=7, ignore_frac=1.0),
}
BAD_INPUTS = ("unequal_shards", "dtype_differs", "local_target_ids", "target_out_of_range", "reference_impl",
              "not_a_group")
MUTANT = "dummy_column_not_zero"  # the comparison must notice a broken backward


def _inputs(case: Case, seed: int):
    """The same global inputs on every rank (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = WORLD * case.vs
    hidden = torch.randn(*case.lead, case.d, dtype=F64, generator=gen)
    weight = torch.randn(vocab, case.d, dtype=F64, generator=gen) * case.scale / case.d**0.5
    bias = torch.randn(vocab, dtype=F64, generator=gen) if case.bias else None
    targets = torch.randint(0, vocab, case.lead, generator=gen)
    targets[torch.rand(case.lead, generator=gen) < case.ignore_frac] = -100
    temperature = (torch.rand(case.lead, dtype=F64, generator=gen) * 1.5 + 0.3
                   if case.temperature == "token" else case.temperature)
    g = torch.zeros(case.lead, dtype=F64) if case.g_zero else torch.randn(case.lead, dtype=F64, generator=gen)
    e = torch.randn(case.lead, dtype=F64, generator=gen)
    dead = torch.rand(case.lead, generator=gen) < case.zero_frac
    g[dead], e[dead] = 0, 0
    return hidden, weight, bias, targets, temperature, g, e


def _run(case, hidden, weight, bias, targets, temperature, g, e, impl, group=None):
    """(logprob, entropy, dh, dW, db) of sum(g * logprob + e * entropy); dh summed over the group."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    h_in = copy_to_vocab_parallel(h, group) if group is not None and case.reduce == "helper" else h
    lp, ent = linear_logprob_entropy(h_in, w, targets, bias=b, temperature=temperature,
                                     compute_entropy=case.compute_entropy, impl=impl, process_group=group)
    assert (ent is None) == (not case.compute_entropy)
    loss = (g * lp).sum() + (0 if ent is None else (e * ent).sum())
    loss.backward()
    zeros_if_none = lambda grad, like: torch.zeros_like(like) if grad is None else grad  # noqa: E731
    dh = zeros_if_none(h.grad, h)
    if group is not None and case.reduce == "manual":
        dist.all_reduce(dh, group=group)  # the op leaves dh as this rank's partial sum
    db = None if b is None else zeros_if_none(b.grad, b)
    return lp.detach(), None if ent is None else ent.detach(), dh, zeros_if_none(w.grad, w), db


def _check_case(case: Case, seed: int, impl: str, group, rank: int) -> None:
    hidden, weight, bias, targets, temperature, g, e = _inputs(case, seed)
    shard = slice(rank * case.vs, (rank + 1) * case.vs)
    ref = _run(case, hidden, weight, bias, targets, temperature, g, e, "reference")
    ref_shard = list(ref[:3]) + [ref[3][shard], None if ref[4] is None else ref[4][shard]]
    got = _run(case, hidden, weight[shard], None if bias is None else bias[shard], targets, temperature, g, e,
               impl, group)
    for name, x, r in zip(("logprob", "entropy", "d_hidden", "d_weight shard", "d_bias shard"), got, ref_shard):
        assert (x is None) == (r is None), name
        if x is not None:
            torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _check_bfloat16(impl: str, group, rank: int) -> None:
    """In bf16 the sharded op is as accurate as the unsharded one (same impl) against the float64 truth,
    row by row: a dummy column leaking into a real row (once: g * W[0] subtracted after triton rounded
    dz to bf16, ~2^-9 |g| per row in dW[0]) shows up as one row far off."""
    case = Case(lead=(256,), vs=128, d=32, temperature=0.8, ignore_frac=0.1, zero_frac=0.1, scale=2.0)
    hidden, weight, bias, targets, temperature, g, e = _inputs(case, seed=99)
    g, e = g / 256, e / 256
    shard = slice(rank * case.vs, (rank + 1) * case.vs)
    low = lambda t: t.to(torch.bfloat16)  # noqa: E731
    truth = _run(case, hidden, weight, bias, targets, temperature, g, e, "reference")
    full = _run(case, low(hidden), low(weight), low(bias), targets, temperature, g, e, impl)
    got = _run(case, low(hidden), low(weight[shard]), low(bias[shard]), targets, temperature, g, e, impl, group)
    for name, t, f, x in zip(("logprob", "entropy", "d_hidden", "d_weight shard", "d_bias shard"), truth, full, got):
        if name.endswith("shard"):
            t, f = t[shard], f[shard]
        err = lambda y: (y.double() - t).reshape(t.shape[0], -1).norm(dim=1)  # noqa: E731  per row
        excess = err(x) - (2 * err(f) + 1e-3 * t.abs().max())
        assert excess.max() <= 0, f"{name}: row {int(excess.argmax())} exceeds its bound by {excess.max():.3g}"


def _check_bad_input(name: str, group, rank: int) -> None:
    vs, d = 5, 4
    hidden = torch.randn(6, d, dtype=F64)
    weight = torch.randn(vs, d, dtype=F64)
    targets = torch.tensor([0, 3, 5, 9, -100, 7])
    impl, expect, match = "torch", ValueError, None
    if name == "unequal_shards":
        weight = torch.randn(vs + rank, d, dtype=F64)
        match = r"weight rows .*\[5, 6\] by rank"
    elif name == "dtype_differs":
        dtype = F64 if rank == 0 else torch.float32
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        match = r"hidden dtype .*\[3, 0\] by rank"
    elif name == "local_target_ids":  # each rank passes ids relative to its own shard
        targets = torch.where(targets >= 0, (targets - rank * vs) % (WORLD * vs), targets)
        match = "same GLOBAL token ids"
    elif name == "target_out_of_range":
        targets = torch.tensor([0, 3, 10, 9, -100, 7])
        match = r"outside \[0, 10\)"
    elif name == "reference_impl":
        impl, match = "reference", "does not support process_group"
    elif name == "not_a_group":
        group, expect, match = "tp", TypeError, "ProcessGroup"
    with pytest.raises(expect, match=match):
        linear_logprob_entropy(hidden, weight, targets, impl=impl, process_group=group)


def _check_mutant(group, rank: int) -> None:
    original = vocab_parallel._append_dummy_column
    # the dummy column repeats row 0 instead of being a zero row with a -inf logit
    vocab_parallel._append_dummy_column = lambda w, b: (torch.cat([w, w[:1]]), torch.cat([b, b[:1]]))
    try:
        with pytest.raises(AssertionError, match="d_hidden"):
            _check_case(CASES["scalar_temperature_bias_entropy"], 0, "torch", group, rank)
    finally:
        vocab_parallel._append_dummy_column = original


def _record(results: dict, key: str, fn, *args) -> None:
    try:
        fn(*args)
        results[key] = None
    except Exception:  # recorded and reported by the test for this key
        results[key] = traceback.format_exc()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    results: dict[str, Optional[str]] = {}
    try:
        for impl in IMPLS:
            for seed, (name, case) in enumerate(CASES.items()):
                _record(results, f"{impl}:{name}", _check_case, case, seed, impl, group, rank)
            _record(results, f"{impl}:bfloat16", _check_bfloat16, impl, group, rank)
        for name in BAD_INPUTS:
            _record(results, name, _check_bad_input, name, group, rank)
        _record(results, MUTANT, _check_mutant, group, rank)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {key: [rank_results.get(key, "not run") for rank_results in per_rank] for key in per_rank[0]}


def _assert_passed(results: dict, key: str) -> None:
    failures = [f"rank {r}:\n{err}" for r, err in enumerate(results[key]) if err is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_unsharded_float64(results, impl, name):
    _assert_passed(results, f"{impl}:{name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_as_accurate_as_unsharded(results, impl):
    _assert_passed(results, f"{impl}:bfloat16")


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_on_every_rank(results, name):
    _assert_passed(results, name)


def test_comparison_catches_a_broken_backward(results):
    _assert_passed(results, MUTANT)
