"""Property (hypothesis): bad input to the public API -- a tensor of the wrong shape, dtype, device or
value range, a non-tensor, a zero-size tensor, a bad temperature, mask, cu_seqlens, ignore_index or
impl -- raises a ValueError or TypeError whose message names the argument: never another exception,
a crash or a silent result. Non-contiguous inputs are valid: they give the contiguous result.

Each example draws valid inputs of a random small shape, then one defect from the catalogues
below; the counts of what was tried (function / argument / defect) are written to the terminal at
the end of the module. Profiles as in test_properties.py (HYPOTHESIS_PROFILE=fast | nightly).
"""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_harness import interpreter_warnings
from prepo_kernels import (available_impls, linear_logprob_entropy, logprob_entropy_from_logits, sequence_mean,
                           sequence_perplexity)
from test_properties import PROFILE

# bad input fails fast: six times the examples of the other properties in the fast profile
CHECKS = settings(PROFILE, max_examples=max(PROFILE.max_examples, 150))

pytestmark = interpreter_warnings
TRIED = Counter()
META = torch.device("meta")
BAD_TEMPERATURES = [float("nan"), float("inf"), 0.0, -1.0, -1e-30]


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    lines = [f"  {n:5d}  {what}" for what, n in sorted(TRIED.items())]
    text = f"\nbad-input property: {sum(TRIED.values())} calls tried, by function / argument / defect:\n"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # into the test run's output, not captured
        print(text + "\n".join(lines))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, non-contiguous (every other element of a buffer twice as long in the last dim)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype) if t.dim() else t
    if t.dim() == 0:
        return t
    wide[..., ::2] = t
    return wide[..., ::2]


def _bad_temperature(draw, n: int):
    value = draw(st.sampled_from(BAD_TEMPERATURES))
    form = draw(st.sampled_from(["float", "0-d tensor", "per-token tensor"]))
    if form == "float":
        return value, form
    t = torch.ones(n)
    t[draw(st.integers(0, n - 1))] = value
    return (t if form == "per-token tensor" else torch.tensor(value)), form


# ------------------------------------------------------------------------------------------------
# linear_logprob_entropy(hidden, weight, targets, bias=, temperature=, ignore_index=, impl=)

def _linear_defect(draw, kw, n, d, v):
    """Replace one argument of a valid call by a bad one: (argument, defect)."""
    arg = draw(st.sampled_from(["hidden", "weight", "targets", "bias", "temperature", "ignore_index", "impl"]))
    choices = {
        "hidden": ["last dim", "0-d", "int dtype", "bool dtype", "complex dtype", "not a tensor", "on meta",
                   "zero rows"],
        "weight": ["1-D", "3-D", "other float dtype", "int dtype", "not a tensor", "on meta", "zero rows", "zero D"],
        "targets": ["shape", "float dtype", "int16 dtype", "id >= V", "negative id", "on meta", "not a tensor"],
        "bias": ["length", "2-D", "other float dtype", "on meta", "not a tensor"],
        "temperature": ["bad value", "shape", "int tensor", "string", "None", "bool", "per-token on meta",
                        "0-d on meta"],
        "ignore_index": ["float", "None", "string"],
        "impl": ["unknown name", "not a string"],
    }[arg]
    defect = draw(st.sampled_from(choices))
    h, w, y = kw["hidden"], kw["weight"], kw["targets"]
    other = torch.float64 if h.dtype != torch.float64 else torch.float32
    new = {
        ("hidden", "last dim"): lambda: torch.randn(n, d + draw(st.integers(1, 3))),
        ("hidden", "0-d"): lambda: torch.tensor(1.0),
        ("hidden", "int dtype"): lambda: h.long(),
        ("hidden", "bool dtype"): lambda: h > 0,
        ("hidden", "complex dtype"): lambda: h.to(torch.complex64),
        ("hidden", "not a tensor"): lambda: h.tolist(),
        ("hidden", "on meta"): lambda: h.to(META),
        ("hidden", "zero rows"): lambda: h[:0],
        ("weight", "1-D"): lambda: w[0],
        ("weight", "3-D"): lambda: w[None],
        ("weight", "other float dtype"): lambda: w.to(other),
        ("weight", "int dtype"): lambda: w.long(),
        ("weight", "not a tensor"): lambda: w.float().numpy(),
        ("weight", "on meta"): lambda: w.to(META),
        ("weight", "zero rows"): lambda: w[:0],
        ("weight", "zero D"): lambda: w[:, :0],
        ("targets", "shape"): lambda: torch.zeros(n + draw(st.integers(1, 3)), dtype=torch.long),
        ("targets", "float dtype"): lambda: y.float(),
        ("targets", "int16 dtype"): lambda: y.to(torch.int16),
        ("targets", "id >= V"): lambda: y.clone().index_fill_(0, torch.tensor([draw(st.integers(0, n - 1))]),
                                                                 v + draw(st.integers(0, 10**6))),
        ("targets", "negative id"): lambda: y.clone().index_fill_(0, torch.tensor([draw(st.integers(0, n - 1))]),
                                                                     -draw(st.integers(1, 99))),
        ("targets", "on meta"): lambda: y.to(META),
        ("targets", "not a tensor"): lambda: y.tolist(),
        ("bias", "length"): lambda: torch.randn(v + draw(st.sampled_from([-1, 1, 2])), dtype=h.dtype),
        ("bias", "2-D"): lambda: torch.randn(1, v, dtype=h.dtype),
        ("bias", "other float dtype"): lambda: torch.randn(v, dtype=other),
        ("bias", "on meta"): lambda: torch.randn(v, dtype=h.dtype, device=META),
        ("bias", "not a tensor"): lambda: [0.0] * v,
        ("temperature", "bad value"): lambda: _bad_temperature(draw, n)[0],
        ("temperature", "shape"): lambda: torch.ones(n + draw(st.integers(1, 3))),
        ("temperature", "int tensor"): lambda: torch.ones(n, dtype=torch.long),
        ("temperature", "string"): lambda: "hot",
        ("temperature", "None"): lambda: None,
        ("temperature", "bool"): lambda: True,
        ("temperature", "per-token on meta"): lambda: torch.ones(n, device=META) if n > 1 else torch.ones(2, device=META),
        ("temperature", "0-d on meta"): lambda: torch.tensor(1.0, device=META),
        ("ignore_index", "float"): lambda: -100.0,
        ("ignore_index", "None"): lambda: None,
        ("ignore_index", "string"): lambda: "-100",
        ("impl", "unknown name"): lambda: draw(st.sampled_from(["fastest", "gpu", "CPU", ""])),
        ("impl", "not a string"): lambda: draw(st.sampled_from([None, 0, ["cpu"]])),
    }[(arg, defect)]()
    if (arg, defect) == ("hidden", "zero rows"):
        kw["targets"] = y[:0]
    kw[arg] = new
    return arg, defect


@CHECKS
@given(data=st.data())
def test_linear_bad_input_names_the_argument(data):
    draw = data.draw
    n, d, v = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 10))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    kw = dict(hidden=torch.randn(n, d).to(dtype), weight=torch.randn(v, d).to(dtype),
              targets=torch.randint(0, v, (n,)), bias=torch.randn(v).to(dtype) if draw(st.booleans()) else None,
              temperature=1.0, ignore_index=-100, impl=draw(st.sampled_from(available_impls("cpu") + ["auto"])))
    if draw(st.integers(0, 9)) == 0:  # non-contiguous hidden / weight: valid, the same result
        want = linear_logprob_entropy(**kw)
        got = linear_logprob_entropy(**dict(kw, hidden=_strided(kw["hidden"]), weight=_strided(kw["weight"])))
        TRIED["linear_logprob_entropy / hidden, weight / non-contiguous (accepted, same result)"] += 1
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return
    arg, defect = _linear_defect(draw, kw, n, d, v)
    TRIED[f"linear_logprob_entropy / {arg} / {defect}"] += 1
    _assert_names(lambda: linear_logprob_entropy(**kw), arg)


def _assert_names(call, arg: str):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert arg in str(info.value), f"the message does not name {arg!r}: {info.value}"


# ------------------------------------------------------------------------------------------------
# logprob_entropy_from_logits(logits, targets, temperature=, ignore_index=, impl=)

LOGITS_DEFECTS = {
    "logits": ["int dtype", "0-d", "not a tensor", "on meta", "zero rows", "zero V"],
    "targets": ["shape", "float dtype", "id >= V", "negative id", "on meta"],
    "temperature": ["bad value", "shape", "int tensor", "0-d on meta"],
    "ignore_index": ["float", "None"],
    "impl": ["unknown name"],
}


@CHECKS
@given(data=st.data())
def test_from_logits_bad_input_names_the_argument(data):
    draw = data.draw
    n, v = draw(st.integers(1, 6)), draw(st.integers(1, 10))
    logits, y = torch.randn(n, v), torch.randint(0, v, (n,))
    kw = dict(logits=logits, targets=y, temperature=1.0, ignore_index=-100,
              impl=draw(st.sampled_from(available_impls("cpu") + ["auto"])))
    if draw(st.integers(0, 9)) == 0:
        want, got = logprob_entropy_from_logits(**kw), logprob_entropy_from_logits(**dict(kw, logits=_strided(logits)))
        TRIED["logprob_entropy_from_logits / logits / non-contiguous (accepted, same result)"] += 1
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b)
        return
    arg = draw(st.sampled_from(sorted(LOGITS_DEFECTS)))
    defect = draw(st.sampled_from(LOGITS_DEFECTS[arg]))
    row = torch.tensor([draw(st.integers(0, n - 1))])
    kw[arg] = {
        ("logits", "int dtype"): lambda: logits.long(),
        ("logits", "0-d"): lambda: torch.tensor(1.0),
        ("logits", "not a tensor"): lambda: logits.tolist(),
        ("logits", "on meta"): lambda: logits.to(META),
        ("logits", "zero rows"): lambda: logits[:0],
        ("logits", "zero V"): lambda: logits[:, :0],
        ("targets", "shape"): lambda: y[None],
        ("targets", "float dtype"): lambda: y.float(),
        ("targets", "id >= V"): lambda: y.clone().index_fill_(0, row, v),
        ("targets", "negative id"): lambda: y.clone().index_fill_(0, row, -1),
        ("targets", "on meta"): lambda: y.to(META),
        ("temperature", "bad value"): lambda: _bad_temperature(draw, n)[0],
        ("temperature", "shape"): lambda: torch.ones(n + 1),
        ("temperature", "int tensor"): lambda: torch.ones(n, dtype=torch.long),
        ("temperature", "0-d on meta"): lambda: torch.tensor(1.0, device=META),
        ("ignore_index", "float"): lambda: -100.0,
        ("ignore_index", "None"): lambda: None,
        ("impl", "unknown name"): lambda: "fastest",
    }[(arg, defect)]()
    if (arg, defect) == ("logits", "zero rows"):
        kw["targets"] = y[:0]
    TRIED[f"logprob_entropy_from_logits / {arg} / {defect}"] += 1
    _assert_names(lambda: logprob_entropy_from_logits(**kw), arg)


# ------------------------------------------------------------------------------------------------
# sequence_mean / sequence_perplexity(values, mask, cu_seqlens=)

SEQUENCE_DEFECTS = {
    "values": ["int dtype", "1-D without cu_seqlens", "3-D", "not a tensor", "2-D with cu_seqlens"],
    "mask": ["shape", "value 2", "value -1", "value 0.5", "NaN", "on meta", "not a tensor"],
    "cu_seqlens": ["float dtype", "2-D", "one entry", "not from 0", "decreasing", "wrong end", "on meta"],
}


@CHECKS
@given(data=st.data())
def test_sequence_bad_input_names_the_argument(data):
    draw = data.draw
    fn = draw(st.sampled_from([sequence_mean, sequence_perplexity]))
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    values, mask = torch.randn(b, t), torch.rand(b, t) < 0.7
    packed, cu = values.flatten(), torch.arange(b + 1) * t
    if draw(st.integers(0, 9)) == 0:
        TRIED[f"{fn.__name__} / values, mask / non-contiguous (accepted, same result)"] += 1
        torch.testing.assert_close(fn(_strided(values), _strided(mask)), fn(values, mask))
        return
    arg = draw(st.sampled_from(sorted(SEQUENCE_DEFECTS)))
    defect = draw(st.sampled_from(SEQUENCE_DEFECTS[arg]))
    i = draw(st.integers(0, b * t - 1))
    bad_mask = lambda x: mask.float().flatten().index_fill(0, torch.tensor([i]), x).view(b, t)  # noqa: E731
    cu_bad = {
        "float dtype": lambda: cu.float(), "2-D": lambda: cu[None], "one entry": lambda: cu[:1],
        "not from 0": lambda: cu + 1, "decreasing": lambda: cu.flip(0), "on meta": lambda: cu.to(META),
        "wrong end": lambda: torch.cat([cu[:-1], cu[-1:] + draw(st.sampled_from([-1, 1, 5]))]),
    }
    call = {
        ("values", "int dtype"): lambda: fn(values.long(), mask),
        ("values", "1-D without cu_seqlens"): lambda: fn(packed),
        ("values", "3-D"): lambda: fn(values[None], mask[None]),
        ("values", "not a tensor"): lambda: fn(values.tolist(), mask),
        ("values", "2-D with cu_seqlens"): lambda: fn(values, cu_seqlens=cu),
        ("mask", "shape"): lambda: fn(values, mask[:, :-1] if t > 1 else mask[None]),
        ("mask", "value 2"): lambda: fn(values, bad_mask(2.0)),
        ("mask", "value -1"): lambda: fn(values, bad_mask(-1.0).long()),
        ("mask", "value 0.5"): lambda: fn(values, bad_mask(0.5)),
        ("mask", "NaN"): lambda: fn(values, bad_mask(float("nan"))),
        ("mask", "on meta"): lambda: fn(values, mask.to(META)),
        ("mask", "not a tensor"): lambda: fn(values, mask.tolist()),
    }.get((arg, defect)) or (lambda: fn(packed, cu_seqlens=cu_bad[defect]()))
    TRIED[f"{fn.__name__} / {arg} / {defect}"] += 1
    _assert_names(call, arg)
