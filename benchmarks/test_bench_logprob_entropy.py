"""pytest-benchmark suite: `python -m pytest benchmarks/ --benchmark-only` (moderate CPU shapes).

The README's tables come from bench_logprob_entropy.py, which also measures memory; this suite is
for quick side-by-side timing with pytest-benchmark's statistics and comparison tools.
"""
import pytest
import torch

import providers

SHAPE = (1024, 256, 8192)
CASES = {}


def case(dtype, zero_frac):
    key = (dtype, zero_frac)
    if key not in CASES:
        CASES[key] = providers.make_case(*SHAPE, dtype, zero_frac)
    return CASES[key]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "mode,zero_frac,name",
    [("fwd", 0.0, n) for n in providers.FLOORS["fwd"] + tuple(providers.FUSED)]
    + [(m, z, n) for m, z in (("fwdbwd", 0.0), ("fwdbwd", 0.5)) for n in providers.FLOORS["fwdbwd"] + tuple(providers.FUSED)],
)
def test_logprob_entropy(benchmark, mode, zero_frac, name, dtype):
    why = providers.unavailable(name)
    if why:
        pytest.skip(why)
    benchmark.group = f"{mode} zero_grad={zero_frac} {dtype}"
    benchmark.pedantic(providers.build(name, mode, case(dtype, zero_frac)), rounds=3, warmup_rounds=1)
