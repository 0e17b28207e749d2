"""Property-based tests (hypothesis) of the public API against the float64 oracle, with the kernel
suite's criterion (tests/kernel_harness.py): linear_logprob_entropy and logprob_entropy_from_logits
on every backend that runs here, sequence_mean and sequence_perplexity on padded and packed layouts.
Vocab-parallel is left to tests/test_vocab_parallel.py. Bad input: tests/test_property_bad_inputs.py.

Two profiles (HYPOTHESIS_PROFILE): "fast" (default; a fixed seed and a few dozen examples per
property, for the default test run) and "nightly" (1,000 random examples per property; .ci/run_sanitize
runs it). A failure prints the falsifying example and a @reproduce_failure blob.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis import given

from kernel_harness import F64, interpreter_warnings, run
from prepo_kernels import (available_impls, linear_logprob_entropy, logprob_entropy_from_logits, sequence_mean,
                           sequence_perplexity)

pytestmark = interpreter_warnings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("fast", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("nightly", max_examples=1000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

BF16, F32 = torch.bfloat16, torch.float32
DTYPES = (F64, F32, BF16)
TOL = {F64: 1e-9, F32: 1e-5, BF16: 1e-2}  # the kernel suite's tolerances (test_kernels.LOW)
EPS = {F64: torch.finfo(F64).eps, F32: torch.finfo(F32).eps, BF16: torch.finfo(F32).eps}  # of the accumulation
UNIT = {dtype: torch.finfo(dtype).eps / 2 for dtype in DTYPES}  # unit roundoff of the inputs' dtype
FUSED_HERE = [i for i in available_impls("cpu") if i != "reference"]
# the Triton interpreter is ~30x slower than the CPU backends: smaller shapes for it
MAX_SHAPE = {"triton": (64, 48, 256)}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _temperature(draw, n: int, gen: torch.Generator):
    """A float in [1e-2, 1e2] (log-uniform), or a per-token tensor of such values, or of [n] drawn
    from one narrow band (all extreme)."""
    kind = draw(st.sampled_from(["scalar", "per_token", "extreme_band"]))
    if kind == "scalar":
        return 10.0 ** draw(st.floats(-2.0, 2.0))
    lo, hi = (-2.0, 2.0) if kind == "per_token" else (draw(st.sampled_from([(-2.0, -1.5), (1.5, 2.0)])))
    return 10.0 ** (lo + (hi - lo) * torch.rand(n, dtype=F64, generator=gen))


def _row_pattern(draw, n: int, gen: torch.Generator) -> torch.Tensor:
    """Which of n rows are hit: none, a random fraction, or all (bool [n])."""
    kind = draw(st.sampled_from(["none", "some", "all"]))
    if kind == "some":
        return torch.rand(n, generator=gen) < draw(st.floats(0.05, 0.95))
    return torch.full((n,), kind == "all")


@st.composite
def linear_cases(draw):
    impl = draw(st.sampled_from(FUSED_HERE))
    max_n, max_d, max_v = MAX_SHAPE.get(impl, (300, 96, 700))
    n, d, vocab = draw(st.integers(1, max_n)), draw(st.integers(1, max_d)), draw(st.integers(1, max_v))
    dtype = draw(st.sampled_from(DTYPES))
    gen = _generator(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(n, d, dtype=F64, generator=gen)
    weight = torch.randn(vocab, d, dtype=F64, generator=gen) / d**0.5
    spread = draw(st.sampled_from(["small", "typical", "wide", "huge"]))
    if spread == "huge":  # |z| ~ 1e4: lse and sum p z nearly cancel in a naive entropy
        weight *= 1e4 / (hidden @ weight.T).abs().max().clamp(min=1e-30)
    else:
        weight *= {"small": 0.1, "typical": 3.0, "wide": 30.0}[spread]
    bias = torch.randn(vocab, dtype=F64, generator=gen) if draw(st.booleans()) else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if bias is not None and vocab > 1 and draw(st.booleans()):  # -inf entries, never on a target
        dead = torch.rand(vocab, generator=gen) < draw(st.floats(0.1, 0.9))
        dead[targets] = False
        bias[dead] = float("-inf")
    targets[_row_pattern(draw, n, gen)] = -100
    g, e = torch.randn(n, dtype=F64, generator=gen), torch.randn(n, dtype=F64, generator=gen)
    zero = _row_pattern(draw, n, gen)  # rows whose upstream gradients are both 0
    g[zero], e[zero] = 0.0, 0.0
    temperature = _temperature(draw, n, gen)
    compute_entropy = draw(st.booleans())
    return impl, dtype, hidden, weight, targets, bias, temperature, (g, e), compute_entropy


def rounding_floor(z, targets, inv_temp, grads, acc_eps: float, unit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a correct backend may be off by where a result cancels to ~0, from the float64 logits z
    [N, V] (after temperature): (per row [N], of logprob and entropy; per logit [N, V], of dz).

    The kernel suite's criterion takes the same-dtype reference's error as the floor, but that
    reference keeps its logits and so is exact by luck where a gradient cancels (a peaked softmax:
    g (1 - p_y) ~ 0); a fused backend cannot be. Two roundings enter:
    * recomputed logits: every z - lse carries about acc_eps (1 + max|z|), so each term of
      dz = inv_temp (g (1[y] - p) - e p (log p + H)) may be off by
      inv_temp (|g| + 2 |e|) (p + 1[y]) acc_eps (1 + max|z|)  (allowed 16x);
    * dz rounded to the input dtype for the backward GEMMs (bf16: Liger's, CCE's and ours):
      unit |dz| per term (allowed 2x).
    A gradient further on may be off by these summed with absolute values (floor @ |W|, ...)."""
    valid = targets != -100
    row = acc_eps * (1 + z.masked_fill(torch.isinf(z), 0).abs().amax(1)) * valid
    p = torch.softmax(z, 1)
    onehot = torch.zeros_like(p)
    onehot[valid, targets[valid]] = 1
    g, e = (t[:, None] for t in grads)
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    entropy = -plogp.sum(1, keepdim=True)
    dz = inv_temp[:, None] * (g * (onehot - p) - e * (plogp + p * entropy)) * valid[:, None]
    recompute = (row * inv_temp * (grads[0].abs() + 2 * grads[1].abs()))[:, None] * (p + onehot)
    return 16 * row, 16 * recompute + 2 * unit * dz.abs()


def _inv_temp(temperature, n: int) -> torch.Tensor:
    return 1 / (temperature if isinstance(temperature, torch.Tensor) else torch.full((n,), temperature, dtype=F64))


def assert_within(impl, dtype, names, truth, ref_low, got, floors):
    """The kernel suite's criterion, |truth - impl| <= |truth - reference in impl's dtype| +
    tol (1 + |truth|), plus the rounding floor where results cancel (rounding_floor)."""
    for name, t, r, x, floor in zip(names, truth, ref_low, got, floors):
        assert torch.isfinite(x).all(), f"{impl} {name}: non-finite values"
        bound = (t - r).abs() + TOL[dtype] * (1 + t.abs()) + floor
        assert torch.all((t - x).abs() <= bound), f"{impl} {dtype} {name}: max excess {((t - x).abs() - bound).max():.3g}"


@PROFILE
@given(case=linear_cases())
def test_linear_logprob_entropy_matches_oracle(case):
    impl, dtype, hidden, weight, targets, bias, temperature, grads, compute_entropy = case
    low = [None if t is None else t.to(dtype).to(F64) for t in (hidden, weight, bias)]  # the rounded inputs
    kwargs = dict(temperature=temperature, grads=grads, compute_entropy=compute_entropy)
    truth = run("reference", "cpu", F64, *low[:2], targets, low[2], **kwargs)
    ref_low = truth if dtype == F64 else run("reference", "cpu", dtype, *low[:2], targets, low[2], **kwargs)
    got = run(impl, "cpu", dtype, *low[:2], targets, low[2], **kwargs)
    inv_temp = _inv_temp(temperature, len(targets))
    z = (low[0] @ low[1].T + (0 if low[2] is None else low[2])) * inv_temp[:, None]
    row, dz = rounding_floor(z, targets, inv_temp, grads, EPS[dtype], UNIT[dtype])
    floors = [row, row, dz @ low[1].abs(), dz.T @ low[0].abs(), dz.sum(0)]
    names = ["logprob", "entropy", "d_hidden", "d_weight", "d_bias"]
    if not compute_entropy:
        del names[1], floors[1]
    assert_within(impl, dtype, names, truth, ref_low, got, floors)
    ignored, d_hidden = targets == -100, got[1 + compute_entropy]
    assert (got[0][ignored] == 0).all() and (d_hidden[ignored] == 0).all()  # ignored rows: 0, no gradient
    assert (got[0] <= 0).all(), f"{impl}: a log-probability > 0"


@st.composite
def logits_cases(draw):
    impl = draw(st.sampled_from(available_impls("cpu")))  # every name runs the same chunked path
    n, vocab = draw(st.integers(1, 300)), draw(st.integers(1, 700))
    dtype = draw(st.sampled_from(DTYPES))
    gen = _generator(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    logits = torch.randn(n, vocab, dtype=F64, generator=gen) * scale
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if vocab > 1 and draw(st.booleans()):  # -inf entries, never on a target
        dead = torch.rand(n, vocab, generator=gen) < 0.5
        dead[torch.arange(n), targets] = False
        logits[dead] = float("-inf")
    targets[_row_pattern(draw, n, gen)] = -100
    temperature = _temperature(draw, n, gen)
    return impl, dtype, logits, targets, temperature, torch.randn(2, n, dtype=F64, generator=gen)


def _from_logits(impl, dtype, logits, targets, temperature, grads):
    """[logprob, entropy, d_logits] of sum(g * logprob + e * entropy), float64 on CPU."""
    x = logits.to(dtype, copy=True).requires_grad_()
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(F64 if dtype == F64 else F32)
    lp, ent = logprob_entropy_from_logits(x, targets, temperature=temperature, impl=impl)
    acc = lp.dtype
    ((lp * grads[0].to(acc)).sum() + (ent * grads[1].to(acc)).sum()).backward()
    return [t.detach().to(F64) for t in (lp, ent, x.grad)]


@PROFILE
@given(case=logits_cases())
def test_logprob_entropy_from_logits_matches_oracle(case):
    impl, dtype, logits, targets, temperature, grads = case
    low = logits.to(dtype).to(F64)  # the rounded inputs
    truth = _from_logits("reference", F64, low, targets, temperature, grads)
    ref_low = truth if dtype == F64 else _from_logits("reference", dtype, low, targets, temperature, grads)
    got = _from_logits(impl, dtype, low, targets, temperature, grads)
    inv_temp = _inv_temp(temperature, len(targets))
    row, dz = rounding_floor(low * inv_temp[:, None], targets, inv_temp, grads, EPS[dtype], UNIT[dtype])
    assert_within(impl, dtype, ("logprob", "entropy", "d_logits"), truth, ref_low, got, (row, row, dz))
    # and the values are a distribution's: logprob <= 0, 0 <= entropy <= log V
    assert (got[0] <= TOL[dtype]).all() and (got[1] >= -TOL[dtype]).all()
    assert (got[1] <= torch.log(torch.tensor(float(logits.shape[1]))) * (1 + TOL[dtype]) + TOL[dtype]).all()


# summed in fp32 / fp64, rounded once to values' dtype (bf16: 2^-8)
SEQUENCE_TOL = {F64: 1e-12, F32: 1e-5, BF16: 4e-3}


@st.composite
def sequence_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 40))
    gen = _generator(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.randint(0, draw(st.integers(1, 300)) + 1, (batch,), generator=gen)
    values = -torch.rand(int(lengths.sum()), dtype=F64, generator=gen) * draw(st.sampled_from([0.1, 3.0, 20.0]))
    keep = _row_pattern(draw, values.numel(), gen) if values.numel() else torch.zeros(0, dtype=torch.bool)
    mask_kind = draw(st.sampled_from(["none", "bool", "float01", "int01"]))
    return dtype, lengths, values, ~keep, mask_kind, draw(st.booleans())


def _oracle_means(lengths, values, mask) -> torch.Tensor:
    out, start = [], 0
    for length in lengths.tolist():
        v, m = values[start:start + length], mask[start:start + length]
        out.append(v[m].mean() if m.any() else torch.zeros((), dtype=F64))
        start += length
    return torch.stack(out)


@PROFILE
@given(case=sequence_cases())
def test_sequence_mean_and_perplexity_match_oracle(case):
    """Padded [B, T] + mask and packed [total] + cu_seqlens give the float64 per-sequence mean (0 with
    no valid token) and perplexity (1.0 then), and d mean / d value = mask / count."""
    dtype, lengths, values, valid, mask_kind, packed = case
    if mask_kind == "none":
        valid = torch.ones_like(valid)
    low = values.to(dtype).to(F64)
    truth = _oracle_means(lengths, low, valid)
    batch, width = len(lengths), max(1, int(lengths.max()))
    if packed:
        x, m = low, valid
        layout = dict(cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    else:  # right-padded with junk under a False mask
        pad = torch.arange(width)[None, :] < lengths[:, None]
        x = torch.full((batch, width), 7.0, dtype=F64).masked_scatter(pad, low)
        m = torch.zeros(batch, width, dtype=torch.bool).masked_scatter(pad, valid)
        layout = {}
    mask = None if mask_kind == "none" and packed else {
        "none": m, "bool": m, "float01": m.to(dtype), "int01": m.to(torch.int32)}[mask_kind]
    leaf = x.to(dtype, copy=True).requires_grad_()
    mean = sequence_mean(leaf, mask, **layout)
    ppl = sequence_perplexity(leaf.detach(), mask, **layout)
    assert mean.dtype == ppl.dtype == dtype and mean.shape == ppl.shape == (batch,)
    tol = SEQUENCE_TOL[dtype] * (1 + truth.abs())
    assert ((mean.double() - truth).abs() <= tol).all(), f"mean: max excess {((mean.double() - truth).abs() - tol).max():.3g}"
    ppl_err = (-ppl.double().log() - truth).abs() - tol - SEQUENCE_TOL[dtype]  # + exp's rounding
    assert (ppl_err <= 0).all(), f"perplexity: max excess {ppl_err.max():.3g}"
    counts = torch.tensor([int(valid[s - n:s].sum()) for s, n in zip(lengths.cumsum(0).tolist(), lengths.tolist())])
    assert (ppl[counts == 0] == 1).all() and (mean[counts == 0] == 0).all()
    mean.double().sum().backward()
    want = m.double() / (counts.clamp(min=1).double()[_row_index(lengths, packed, width)])
    assert ((leaf.grad.double() - want).abs() <= TOL[dtype] * want.abs() + 1e-30).all()


def _row_index(lengths, packed: bool, width: int) -> torch.Tensor:
    """The sequence index of every position of the layout."""
    if packed:
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return torch.arange(len(lengths))[:, None].expand(len(lengths), width)


@pytest.mark.parametrize("impl", FUSED_HERE + ["reference"])
def test_one_word_vocabulary_is_exact(impl):
    """Found by the linear property (fixed in csrc/cpu/lle_cpu.cpp): with V = 1 and a temperature
    != 1 the native CPU forward gave log-probs of +1e-8 and its backward gradients where there are
    none (the compiler fused raw * sc - max into an fma). Every backend: exactly 0."""
    hidden = torch.tensor([[1.5410], [-0.0293]], requires_grad=True)
    weight = torch.tensor([[-0.8803]], requires_grad=True)
    for temperature in (1.0, 0.0171, 37.0):
        lp, ent = linear_logprob_entropy(hidden, weight, torch.tensor([0, 0]), temperature=temperature, impl=impl)
        hidden.grad = weight.grad = None
        (lp.sum() + ent.sum()).backward()
        assert (lp == 0).all() and (ent == 0).all(), (temperature, lp, ent)
        assert (hidden.grad == 0).all() and (weight.grad == 0).all(), temperature
