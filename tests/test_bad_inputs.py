"""Bad input gets a ValueError/TypeError whose message names what is wrong."""
import pytest
import torch

import prepo_kernels as pk
from prepo_kernels import linear_logprob_entropy, logprob_entropy_from_logits, sequence_mean

H = torch.randn(4, 8)
W = torch.randn(10, 8)
Y = torch.randint(0, 10, (4,))


def call(**overrides):
    kwargs = dict(hidden=H, weight=W, targets=Y)
    kwargs.update(overrides)
    return linear_logprob_entropy(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)


CASES = [
    ("D mismatch", dict(hidden=torch.randn(4, 7)), ValueError, "last dim"),
    ("targets too large", dict(targets=torch.tensor([0, 1, 2, 10])), ValueError, "outside \\[0, 10\\)"),
    ("negative target", dict(targets=torch.tensor([0, -1, 2, 3])), ValueError, "targets contains -1"),
    ("float targets", dict(targets=Y.float()), TypeError, "targets must be an int64"),
    ("targets shape", dict(targets=Y[:3]), ValueError, "targets shape"),
    ("weight not 2-D", dict(weight=torch.randn(10, 8, 1)), ValueError, "weight must be 2-D"),
    ("weight dtype", dict(weight=W.double()), TypeError, "weight dtype"),
    ("integer hidden", dict(hidden=H.long()), TypeError, "hidden must be float"),
    ("hidden not a tensor", dict(hidden=H.tolist()), TypeError, "hidden must be a torch.Tensor"),
    ("empty hidden", dict(hidden=torch.randn(0, 8), targets=Y[:0]), ValueError, "empty input"),
    ("empty vocab", dict(weight=torch.randn(0, 8), targets=torch.full((4,), -100)), ValueError, "empty input"),
    ("temperature zero", dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    ("temperature NaN", dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    ("temperature negative tensor", dict(temperature=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "temperature"),
    ("temperature bad shape", dict(temperature=torch.ones(3)), ValueError, "does not broadcast"),
    ("temperature string", dict(temperature="hot"), TypeError, "temperature must be a float"),
    ("bias shape", dict(bias=torch.randn(9)), ValueError, "bias must be \\[V\\]"),
    ("unknown impl", dict(impl="fastest"), ValueError, "impl must be 'auto' or one of"),
    ("ignore_index type", dict(ignore_index=None), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("overrides,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_linear_bad_inputs(overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(**overrides)


def test_different_devices():
    meta_w = W.to("meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        call(weight=meta_w)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pk.BackendUnavailableError, match="impl='cuda' is unavailable on cpu"):
        call(impl="cuda")


def test_env_override(monkeypatch):
    monkeypatch.setenv("PREPO_KERNELS_IMPL", "reference")
    lp, _ = call()
    assert lp.dtype == torch.float32
    monkeypatch.setenv("PREPO_KERNELS_IMPL", "bogus")
    with pytest.raises(ValueError, match="PREPO_KERNELS_IMPL='bogus'"):
        call()


def test_from_logits_bad_inputs():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets shape"):
        logprob_entropy_from_logits(logits, Y[:2])
    with pytest.raises(ValueError, match="outside"):
        logprob_entropy_from_logits(logits, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="impl must be 'auto' or one of"):
        logprob_entropy_from_logits(logits, Y, impl="fastest")
    with pytest.raises(pk.BackendUnavailableError, match="impl='cuda' is unavailable on cpu"):
        logprob_entropy_from_logits(logits, Y, impl="cuda")


SEQ_CASES = [
    (dict(values=torch.randn(2, 3), mask=torch.ones(2, 4)), "mask shape"),
    (dict(values=torch.randn(2, 3), mask=torch.full((2, 3), 2.0)), "mask must be boolean"),
    (dict(values=torch.randn(6)), "padded values must be 2-D"),
    (dict(values=torch.randn(6), cu_seqlens=torch.tensor([0, 2, 5])), "end at values.numel\\(\\)=6"),
    (dict(values=torch.randn(6), cu_seqlens=torch.tensor([0, 4, 2, 6])), "never decrease"),
    (dict(values=torch.randn(6), cu_seqlens=torch.tensor([1, 6])), "start at 0"),
    (dict(values=torch.randn(2, 3), cu_seqlens=torch.tensor([0, 6])), "packed values must be 1-D"),
]


@pytest.mark.parametrize("kwargs,match", SEQ_CASES)
def test_sequence_bad_inputs(kwargs, match):
    values = kwargs.pop("values")
    with pytest.raises(ValueError, match=match):
        sequence_mean(values, **kwargs)


def test_sequence_float_cu_seqlens():
    with pytest.raises(TypeError, match="cu_seqlens must be an int64"):
        sequence_mean(torch.randn(4), cu_seqlens=torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize("impl", pk.available_impls("cpu"))
def test_target_range_checked_once_per_call(impl, monkeypatch):
    """One check of the target ids per call, forward and backward together (on CUDA each is a host
    sync); the backends and the native ops do not check them again."""
    from prepo_kernels import validation

    calls = []
    original = validation._targets_error
    monkeypatch.setattr(validation, "_targets_error", lambda *a: calls.append(a) or original(*a))
    h, w = H.clone().requires_grad_(), W.clone().requires_grad_()
    lp, ent = linear_logprob_entropy(h, w, torch.tensor([0, -100, 9, 3]), impl=impl)
    (lp.sum() + ent.sum()).backward()
    assert len(calls) == 1
    with pytest.raises(ValueError, match="outside"):
        call(targets=torch.tensor([0, 1, 2, 10]), impl=impl)
