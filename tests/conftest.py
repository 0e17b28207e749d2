import pytest
import torch

from prepo_kernels import available_impls


def fused_cpu_impls() -> list[str]:
    """Fused backends that run on CPU tensors here (the C++ one only when built)."""
    return [impl for impl in available_impls("cpu") if impl in ("torch", "cpu")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
