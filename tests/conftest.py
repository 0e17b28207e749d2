import importlib.util

import pytest
import torch

from prepo_kernels import available_impls


def fused_cpu_impls() -> list[str]:
    """Fused backends that run on CPU tensors here (the C++ one only when built)."""
    return [impl for impl in available_impls("cpu") if impl in ("torch", "cpu")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The GPU image may lack the trainer's dependencies; kernel tests must still collect there.
_TRAINER_DEPS = ("transformers", "math_verify", "yaml")
collect_ignore = []
if any(importlib.util.find_spec(m) is None for m in _TRAINER_DEPS):
    collect_ignore += ["test_hf.py", "test_prepo_units.py", "test_prepo_train.py", "test_rollout_efficiency.py"]
