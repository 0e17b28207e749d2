"""prepo_kernels.available_impls(device) lists exactly the names impl= accepts on that device, in
the order impl="auto" prefers them."""
import pytest
import torch

import prepo_kernels as pk
from kernel_harness import interpreter_warnings
from prepo_kernels.backends import registry

pytestmark = interpreter_warnings

H, W = torch.randn(3, 4), torch.randn(5, 4)
Y = torch.tensor([0, 4, -100])


def accepted(impl: str, device: str) -> bool:
    try:
        registry.resolve(impl, torch.device(device))
    except pk.BackendUnavailableError:
        return False
    return True


@pytest.mark.parametrize("interpret", ["0", "1"])
@pytest.mark.parametrize("device", ["cpu", "cuda", "meta"])
def test_lists_what_impl_accepts(monkeypatch, device, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    listed = pk.available_impls(device)
    assert listed == [i for i in listed if i in registry.IMPLS] and listed[-1] == "reference"
    assert sorted(listed) == sorted(i for i in registry.IMPLS if accepted(i, device))
    if len(listed) > 1:
        assert registry.resolve("auto", torch.device(device)) == listed[0]


def test_triton_interpreter_is_listed_on_cpu(monkeypatch):
    """The issue's case: impl="triton" runs on CPU under TRITON_INTERPRET=1 (conftest sets it), so it
    is listed, last among the fused backends (the interpreter is the slowest); auto is unchanged."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    listed = pk.available_impls("cpu")
    assert listed[-2:] == ["triton", "reference"] and listed[0] != "triton"
    for impl in listed:  # every listed name really runs here
        lp, ent = pk.linear_logprob_entropy(H, W, Y, impl=impl)
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in pk.available_impls("cpu")
