"""prepo_kernels.available_impls(device) lists exactly the names with which the op runs on that
device, in the order impl="auto" prefers them (checked by calling the op, not the registry)."""
import pytest
import torch

import prepo_kernels as pk
from kernel_harness import interpreter_warnings
from prepo_kernels.backends import registry

pytestmark = interpreter_warnings

H, W = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
Y = torch.tensor([0, 4, -100])
# the devices this machine can make tensors on (meta: shapes only, no values)
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def run(impl: str, device: str):
    """linear_logprob_entropy(impl=...) on ``device`` as a user calls it: (log-prob, entropy), or
    None when the op refuses the backend there."""
    try:
        return pk.linear_logprob_entropy(H.to(device), W.to(device), Y.to(device), impl=impl)
    except pk.BackendUnavailableError:
        return None


def truth():
    """Log-prob and entropy in float64 from the full logits (0 at the ignored target)."""
    logp = torch.log_softmax(H @ W.T, dim=-1)
    lp = logp.gather(1, Y.clamp(min=0)[:, None]).squeeze(1).masked_fill(Y < 0, 0)
    return lp, -(logp.exp() * logp).sum(-1).masked_fill(Y < 0, 0)


@pytest.mark.parametrize("interpret", ["0", "1"])
@pytest.mark.parametrize("device", DEVICES)
def test_lists_what_impl_accepts(monkeypatch, device, interpret):
    """Every listed name runs the op on ``device`` (on real tensors, to the float64 truth), every
    other name is refused there, and "auto" runs the first listed."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    listed = pk.available_impls(device)
    assert listed[-1] == "reference" and len(set(listed)) == len(listed)
    for impl in registry.IMPLS:
        out = run(impl, device)
        assert (out is not None) == (impl in listed), impl
        if out is not None and device != "meta":
            for got, want in zip(out, truth()):
                torch.testing.assert_close(got.cpu().masked_fill(Y < 0, 0), want, rtol=1e-6, atol=1e-6, msg=impl)
    if device != "meta":   # meta tensors take the op's shape function, no backend runs
        ran = []
        real_get = registry.get
        monkeypatch.setattr(registry, "get", lambda name: ran.append(name) or real_get(name))
        run("auto", device)
        assert set(ran) == {listed[0]}, ran


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
