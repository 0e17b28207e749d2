"""The native ops torch.ops.prepo_kernels.lle_forward / lle_backward (csrc/, backends/cpp.py), called
directly, on each dispatch key they are built for: CPU here, CUDA where a GPU and the CUDA kernels
are present (marker ``gpu``; skipped, saying why, elsewhere). The public-API tests of the "cpu" and
"cuda" backends are in test_kernels.py (same harness, same float64 reference).

Skipped as a whole when the extension prepo_kernels._C is not built.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("prepo_kernels._C", reason="native extension prepo_kernels._C not built")

from kernel_harness import device_params, raw_oracle  # noqa: E402
from prepo_kernels.backends import cpp  # noqa: E402  (registers the fake kernels)
from prepo_kernels.backends.base import BackwardInputs, ForwardInputs, KernelParams  # noqa: E402

ops = torch.ops.prepo_kernels
NEG_INF = float("-inf")
# the op's dispatch keys: "cpu" backend on CPU tensors, "cuda" backend on CUDA tensors
DEVICES = device_params("cpu") + device_params("cuda")


# ------------------------------------------------------------------------------------------------
# helpers


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(n, D, V, dtype=torch.float32, bias=False, neg_inf_bias=False, temp="one", scale=1.0, seed=0,
                device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen, dtype=torch.float64)
    W = torch.randn(V, D, generator=gen, dtype=torch.float64) * (scale / math.sqrt(D))
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    if neg_inf_bias:
        b[1::3] = NEG_INF
    y = torch.randint(0, V, (n,), generator=gen)
    if b is not None:  # keep targets on finite logits
        finite = torch.nonzero(torch.isfinite(b)).flatten()
        y = finite[torch.randint(0, finite.numel(), (n,), generator=gen)]
    if temp == "one":
        it = torch.ones(n, dtype=torch.float64)
    else:  # per-row inverse temperature
        it = 0.4 + 1.6 * torch.rand(n, generator=gen, dtype=torch.float64)
    acc = acc_dtype(dtype)
    to = lambda t, d: None if t is None else t.to(device, d)  # noqa: E731
    return (to(h, dtype), to(W, dtype), to(b, dtype), y.to(device), to(it, acc))


def tol(dtype):
    # outputs are computed in fp32 for low-precision inputs; the oracle sees the same rounded inputs
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]


def grad_tol(dtype):
    # grad_weight comes back in the weight's dtype (rounded once); the bf16 CPU path also rounds dz
    # to bf16 (8 significant bits) for its two backward GEMMs, as bf16 GEMM kernels must: relative
    # error up to ~2^-8 (tests/test_native_bf16.py and the kernel suite hold the gradients to "no
    # worse than naive PyTorch in the same dtype")
    return {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, tol(dtype))


def assert_close(actual, expected, rtol, atol=None, what=""):
    atol = rtol if atol is None else atol
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=["default", "tiny"])
def tiles(request, monkeypatch):
    """Run with the default tiles and with tiny ones (many vocab tiles, several row blocks and
    partitions, ragged last tiles)."""
    if request.param == "tiny":
        monkeypatch.setenv("PREPO_CPU_VOCAB_TILE", "64")
        monkeypatch.setenv("PREPO_CPU_ROW_TILE", "3")
    return request.param


# ------------------------------------------------------------------------------------------------
# numerics against the float64 oracle

CASES = [
    # n, D, V, bias, neg_inf_bias, temp
    (1, 8, 5, False, False, "one"),  # n = 1, V smaller than any tile
    (7, 17, 1000, True, False, "rows"),  # odd D, V < default tile
    (13, 33, 3001, True, True, "rows"),  # V not a multiple of the tile, -inf bias entries
    (40, 16, 2048, False, False, "rows"),  # V a multiple of the tile
    (5, 3, 2049, True, False, "one"),  # tile + 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_D{}_V{}_b{}_inf{}_{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_oracle(case, dtype, device, tiles):
    n, D, V, bias, neg_inf, temp = case
    h, W, b, y, it = make_inputs(n, D, V, dtype, bias=bias, neg_inf_bias=neg_inf, temp=temp, scale=3.0, device=device)
    acc = acc_dtype(dtype)
    g = torch.randn(n, dtype=acc, device=device)
    e = torch.randn(n, dtype=acc, device=device)
    logprob, entropy, lse = ops.lle_forward(h, W, b, y, it, True)
    assert logprob.dtype == entropy.dtype == lse.dtype == acc
    assert logprob.shape == entropy.shape == lse.shape == (n,)
    grad_h, grad_w, grad_b = ops.lle_backward(g, e, h, W, b, y, it, lse, entropy)
    assert grad_h.dtype == acc and grad_w.dtype == dtype and grad_h.shape == (n, D) and grad_w.shape == (V, D)
    ref = raw_oracle(h, W, b, y, it, g, e)
    names = ("logprob", "entropy", "lse", "grad_hidden", "grad_weight")
    for name, got, want in zip(names, (logprob, entropy, lse, grad_h, grad_w), ref):
        assert torch.isfinite(got).all(), name
        assert_close(got, want, grad_tol(dtype) if name.startswith("grad") else tol(dtype), what=name)
    if b is None:
        assert grad_b.numel() == 0
    else:
        assert grad_b.shape == (V,) and grad_b.dtype == acc
        assert_close(grad_b, ref[5], grad_tol(dtype), what="grad_bias")
        dead = torch.isinf(b.double()).cpu()
        if dead.any():  # -inf logits contribute exactly 0
            assert (grad_w.cpu()[dead] == 0).all() and (grad_b.cpu()[dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_without_entropy(dtype, device, tiles):
    h, W, b, y, it = make_inputs(9, 12, 700, dtype, bias=True, temp="rows", device=device)
    g = torch.randn(9, dtype=acc_dtype(dtype), device=device)
    logprob, entropy, lse = ops.lle_forward(h, W, b, y, it, False)
    assert entropy.numel() == 0
    grad_h, grad_w, grad_b = ops.lle_backward(g, None, h, W, b, y, it, lse, entropy)
    ref = raw_oracle(h, W, b, y, it, g, None)
    t = tol(dtype)
    assert_close(logprob, ref[0], t, what="logprob")
    assert_close(lse, ref[2], t, what="lse")
    assert_close(grad_h, ref[3], t, what="grad_hidden")
    assert_close(grad_w, ref[4], t, what="grad_weight")
    assert_close(grad_b, ref[5], t, what="grad_bias")


@pytest.mark.parametrize("use_bias", [False, True])
def test_large_logits_are_stable(use_bias, tiles):
    """|z| ~ 1e4 with small spreads: the entropy must come from sum p (z - m), not lse - sum p z.
    Inputs are chosen so that z is exact in fp32 (multiples of 1/32 around 1e4)."""
    n, D, V = 6, 16, 777
    gen = torch.Generator().manual_seed(3)
    h = torch.randint(-2, 3, (n, D), generator=gen).double() / 4
    W = torch.randint(-4, 5, (V, D), generator=gen).double() / 8
    if use_bias:
        b = 1e4 + torch.randint(-3, 4, (V,), generator=gen).double()
    else:  # the offset comes through the matmul: one column with h = 100, w = 100 (-100 for a few
        # rows, whose z ~ -1e4 then underflow to p = 0)
        h[:, 0] = 100.0
        W[:, 0] = 100.0
        W[::50, 0] = -100.0
        b = None
    y = 1 + 50 * torch.randint(0, V // 50, (n,), generator=gen)  # targets on the z ~ +1e4 side
    it = torch.ones(n, dtype=torch.float64)
    g, e = torch.randn(n, generator=gen).double(), torch.randn(n, generator=gen).double()
    ref = raw_oracle(h, W, b, y, it, g, e)
    f32 = lambda x: None if x is None else x.float()  # noqa: E731
    logprob, entropy, lse = ops.lle_forward(f32(h), f32(W), f32(b), y, f32(it), True)
    assert lse.abs().min() > 5e3
    assert (ref[1] > 0.5).all()
    # float32 lse ~ 1e4 carries ~5e-4 absolute rounding; logprob and entropy must not
    assert_close(lse, ref[2], 1e-6, what="lse")
    torch.testing.assert_close(logprob.double(), ref[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref[1], rtol=0, atol=2e-5)
    grad_h, grad_w, grad_b = ops.lle_backward(f32(g), f32(e), f32(h), f32(W), f32(b), y, f32(it), lse, entropy)
    # backward gets lse as float32 (the op's output), off by up to ~5e-4 at 1e4, which scales every p
    # of a row by the same (1 + 5e-4): gradients carry that relative error. (Column 0 of grad_hidden,
    # a near-total cancellation of +-100 * dz terms when the offset comes through the matmul, is
    # left out.)
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert_close(grad_w, ref[4], 2e-3, what="grad_weight")
    assert_close(grad_h[:, 1:], ref[3][:, 1:], 2e-3, what="grad_hidden")


def test_all_but_one_logit_neg_inf():
    """Entries with z = -inf contribute exactly 0: entropy exactly 0, logprob exactly 0."""
    n, D, V = 3, 4, 300
    h, W, _, _, it = make_inputs(n, D, V)
    b = torch.full((V,), NEG_INF)
    b[17] = 0.0
    y = torch.full((n,), 17)
    logprob, entropy, lse = ops.lle_forward(h, W, b, y, it, True)
    assert (logprob == 0).all() and (entropy == 0).all()
    grad_h, grad_w, grad_b = ops.lle_backward(torch.ones(n), torch.ones(n), h, W, b, y, it, lse, entropy)
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all() and torch.isfinite(grad_b).all()
    assert (grad_h == 0).all() and (grad_w == 0).all() and (grad_b == 0).all()


def test_backward_with_no_rows():
    h, W, b, _, _ = make_inputs(4, 8, 50, bias=True)
    e0 = torch.empty(0)
    grad_h, grad_w, grad_b = ops.lle_backward(e0, e0, h[:0], W, b, torch.empty(0, dtype=torch.long), e0, e0, e0)
    assert grad_h.shape == (0, 8) and (grad_w == 0).all() and grad_w.shape == (50, 8) and (grad_b == 0).all()


def test_deterministic_and_thread_count_independent(monkeypatch):
    monkeypatch.setenv("PREPO_CPU_VOCAB_TILE", "128")
    monkeypatch.setenv("PREPO_CPU_ROW_TILE", "16")
    h, W, b, y, it = make_inputs(70, 32, 1500, bias=True, temp="rows")
    g, e = torch.randn(70), torch.randn(70)

    def run():
        lp, ent, lse = ops.lle_forward(h, W, b, y, it, True)
        return (lp, ent, lse) + tuple(ops.lle_backward(g, e, h, W, b, y, it, lse, ent))

    first, second = run(), run()
    for a, c in zip(first, second):
        assert torch.equal(a, c)  # bitwise reproducible run to run
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(first, single):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_target_ids_are_not_checked_again_and_never_read_out_of_range():
    """The public API checks target ids once per call; the raw ops trust them and never index with
    one: an id outside [0, V) matches no column, so its z_y is 0 (logprob = -lse) and it adds no
    g * 1[v=y] term in backward."""
    h, W, b, y, it = make_inputs(4, 8, 50, bias=True)
    bad = torch.tensor([0, 1, 50, -7])
    lp, ent, lse = ops.lle_forward(h, W, b, bad, it, True)
    good = ops.lle_forward(h, W, b, y, it, True)
    torch.testing.assert_close(lse, good[2], rtol=0, atol=0)
    assert torch.equal(lp[2:], -lse[2:])
    g, e = torch.randn(4, dtype=h.dtype), torch.randn(4, dtype=h.dtype)
    grads = ops.lle_backward(g, e, h, W, b, bad, it, lse, ent)
    # the oracle: rows 2, 3 point at an extra column of probability 0 (zero weight row, -inf bias)
    W1, b1 = torch.cat([W, W.new_zeros(1, 8)]), torch.cat([b, b.new_full((1,), NEG_INF)])
    ref = raw_oracle(h, W1, b1, torch.tensor([0, 1, 50, 50]), it, g, e)
    for got, want in zip(grads, (ref[3], ref[4][:50], ref[5][:50])):
        assert_close(got, want, 2e-5)


def test_rejects_bad_inputs():
    h, W, b, y, it = make_inputs(4, 8, 50, bias=True)
    with pytest.raises(RuntimeError, match="disagree on D"):
        ops.lle_forward(h[:, :7], W, b, y, it, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.lle_forward(h, W.double(), b, y, it, True)


# ------------------------------------------------------------------------------------------------
# torch.library integration: opcheck, torch.compile


def _opcheck_cases():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for bias in (False, True):
            yield dtype, bias, (6, 8, 300)
    yield torch.float16, True, (1, 5, 3)
    yield torch.float32, False, (33, 17, 2049)


@pytest.mark.parametrize("dtype,bias,shape", list(_opcheck_cases()), ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(dtype, bias, shape, device):
    """Schema, fake kernel and AOT dispatch. Inputs do not require grad: the raw ops have no autograd
    formula (gradients go through prepo_kernels::fused_lle, opchecked in test_kernels.py)."""
    n, D, V = shape
    h, W, b, y, it = make_inputs(n, D, V, dtype, bias=bias, temp="rows", device=device)
    for compute_entropy in (True, False):
        torch.library.opcheck(ops.lle_forward.default, (h, W, b, y, it, compute_entropy))


@pytest.mark.parametrize("dtype,bias,shape", list(_opcheck_cases()), ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(dtype, bias, shape, device):
    n, D, V = shape
    h, W, b, y, it = make_inputs(n, D, V, dtype, bias=bias, temp="rows", device=device)
    acc = acc_dtype(dtype)
    _, entropy, lse = ops.lle_forward(h, W, b, y, it, True)
    g, e = torch.randn(n, dtype=acc, device=device), torch.randn(n, dtype=acc, device=device)
    torch.library.opcheck(ops.lle_backward.default, (g, e, h, W, b, y, it, lse, entropy))
    torch.library.opcheck(ops.lle_backward.default, (g, None, h, W, b, y, it, lse, entropy))


def test_torch_compile_fullgraph():
    """The raw ops in a compiled graph (their fake kernels); the public API's compile tests, forward
    and backward through prepo_kernels::fused_lle, are in test_compile.py."""
    torch._dynamo.reset()
    h, W, b, y, it = make_inputs(10, 16, 500, bias=True, temp="rows")
    g, e = torch.randn(10), torch.randn(10)

    def fwd(h, W, b, y, it):
        return ops.lle_forward(h, W, b, y, it, True)

    def bwd(g, e, h, W, b, y, it, lse, ent):
        return ops.lle_backward(g, e, h, W, b, y, it, lse, ent)

    expected = fwd(h, W, b, y, it)
    got = torch.compile(fwd, fullgraph=True, backend="aot_eager")(h, W, b, y, it)
    for a, c in zip(got, expected):
        torch.testing.assert_close(a, c)
    lp, ent, lse = expected
    expected_b = bwd(g, e, h, W, b, y, it, lse, ent)
    got_b = torch.compile(bwd, fullgraph=True, backend="aot_eager")(g, e, h, W, b, y, it, lse, ent)
    for a, c in zip(got_b, expected_b):
        torch.testing.assert_close(a, c)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# the backend objects


def test_backend_objects():
    assert cpp.BACKENDS["cpu"].unavailable_reason(torch.device("cpu")) is None
    assert cpp.BACKENDS["cpu"].unavailable_reason(torch.device("meta")) is not None
    cuda_reason = cpp.BACKENDS["cuda"].unavailable_reason(torch.device("cuda"))
    assert (cuda_reason is None) == cpp.has_cuda_kernels()
    assert cpp.BACKENDS["cuda"].unavailable_reason(torch.device("cpu")) is not None

    h, W, b, y, it = make_inputs(5, 6, 90, bias=True, temp="rows")
    backend = cpp.BACKENDS["cpu"]
    lp, ent, lse = backend.forward(ForwardInputs(h, W, b, y, it, KernelParams(compute_entropy=True)))
    g, e = torch.randn(5), torch.randn(5)
    grad_h, grad_w, grad_b = backend.backward(BackwardInputs(h, W, b, y, it, KernelParams(), g, e, lse, ent))
    ref = raw_oracle(h, W, b, y, it, g, e)
    assert_close(grad_h, ref[3], 2e-5)
    assert_close(grad_b, ref[5], 2e-5)
    _, _, grad_none = backend.backward(BackwardInputs(h, W, None, y, it, KernelParams(), g, e, lse, ent))
    assert grad_none is None
