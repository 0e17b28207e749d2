"""The native CPU ops torch.ops.prepo_kernels.lle_forward / lle_backward (csrc/, backends/cpp.py).

Skipped as a whole when the extension prepo_kernels._C is not built.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("prepo_kernels._C", reason="native extension prepo_kernels._C not built")

from prepo_kernels.backends import cpp  # noqa: E402  (registers the fake kernels and autograd)
from prepo_kernels.backends.base import KernelParams  # noqa: E402

ops = torch.ops.prepo_kernels
NEG_INF = float("-inf")
LOWP = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------
# helpers


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(n, D, V, dtype=torch.float32, bias=False, neg_inf_bias=False, temp="one", scale=1.0, seed=0):
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
    return (h.to(dtype), W.to(dtype), None if b is None else b.to(dtype), y, it.to(acc))


def reference(h, W, b, y, it, g=None, e=None):
    """float64 dense oracle: (logprob, entropy, lse, grad_hidden, grad_weight, grad_bias)."""
    h, W, it = h.double(), W.double(), it.double()
    z = h @ W.T
    if b is not None:
        z = z + b.double()
    z = z * it[:, None]
    lse = torch.logsumexp(z, dim=1)
    p = torch.exp(z - lse[:, None])
    zf = torch.where(p > 0, z, torch.zeros_like(z))
    logprob = z.gather(1, y[:, None])[:, 0] - lse
    entropy = lse - (p * zf).sum(1)
    if g is None:
        return logprob, entropy, lse
    g = g.double()
    dz = g[:, None] * (torch.nn.functional.one_hot(y, W.shape[0]).double() - p)
    if e is not None:
        dz = dz - e.double()[:, None] * p * (zf - lse[:, None] + entropy[:, None])
    dz = dz * it[:, None]
    return logprob, entropy, lse, dz @ W, dz.T @ h, None if b is None else dz.sum(0)


def tol(dtype):
    # outputs are computed in fp32 for low-precision inputs; the oracle sees the same rounded inputs
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]


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
def test_matches_float64_oracle(case, dtype, tiles):
    n, D, V, bias, neg_inf, temp = case
    h, W, b, y, it = make_inputs(n, D, V, dtype, bias=bias, neg_inf_bias=neg_inf, temp=temp, scale=3.0)
    acc = acc_dtype(dtype)
    g = torch.randn(n, dtype=acc)
    e = torch.randn(n, dtype=acc)
    logprob, entropy, lse = ops.lle_forward(h, W, b, y, it, True)
    assert logprob.dtype == entropy.dtype == lse.dtype == acc
    assert logprob.shape == entropy.shape == lse.shape == (n,)
    grad_h, grad_w, grad_b = ops.lle_backward(g, e, h, W, b, y, it, lse, entropy)
    assert grad_h.dtype == grad_w.dtype == acc and grad_h.shape == (n, D) and grad_w.shape == (V, D)
    ref = reference(h, W, b, y, it, g, e)
    t = tol(dtype)
    for name, got, want in zip(("logprob", "entropy", "lse", "grad_hidden", "grad_weight"), (logprob, entropy, lse, grad_h, grad_w), ref):
        assert torch.isfinite(got).all(), name
        assert_close(got, want, t, what=name)
    if b is None:
        assert grad_b.numel() == 0
    else:
        assert grad_b.shape == (V,) and grad_b.dtype == acc
        assert_close(grad_b, ref[5], t, what="grad_bias")
        dead = torch.isinf(b.double())
        if dead.any():  # -inf logits contribute exactly 0
            assert (grad_w[dead] == 0).all() and (grad_b[dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_entropy(dtype, tiles):
    h, W, b, y, it = make_inputs(9, 12, 700, dtype, bias=True, temp="rows")
    g = torch.randn(9, dtype=acc_dtype(dtype))
    logprob, entropy, lse = ops.lle_forward(h, W, b, y, it, False)
    assert entropy.numel() == 0
    grad_h, grad_w, grad_b = ops.lle_backward(g, None, h, W, b, y, it, lse, entropy)
    ref = reference(h, W, b, y, it, g, None)
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
    ref = reference(h, W, b, y, it, g, e)
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


def test_rejects_bad_inputs():
    h, W, b, y, it = make_inputs(4, 8, 50, bias=True)
    with pytest.raises(RuntimeError, match="outside"):
        ops.lle_forward(h, W, b, torch.tensor([0, 1, 50, 2]), it, True)
    with pytest.raises(RuntimeError, match="disagree on D"):
        ops.lle_forward(h[:, :7], W, b, y, it, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.lle_forward(h, W.double(), b, y, it, True)


# ------------------------------------------------------------------------------------------------
# torch.library integration: opcheck, torch.compile, gradcheck


def _opcheck_cases():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for bias in (False, True):
            yield dtype, bias, (6, 8, 300)
    yield torch.float16, True, (1, 5, 3)
    yield torch.float32, False, (33, 17, 2049)


@pytest.mark.parametrize("dtype,bias,shape", list(_opcheck_cases()), ids=str)
def test_opcheck_forward(dtype, bias, shape):
    n, D, V = shape
    h, W, b, y, it = make_inputs(n, D, V, dtype, bias=bias, temp="rows")
    h.requires_grad_(True)
    W.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    for compute_entropy in (True, False):
        torch.library.opcheck(ops.lle_forward.default, (h, W, b, y, it, compute_entropy))


@pytest.mark.parametrize("dtype,bias,shape", list(_opcheck_cases()), ids=str)
def test_opcheck_backward(dtype, bias, shape):
    n, D, V = shape
    h, W, b, y, it = make_inputs(n, D, V, dtype, bias=bias, temp="rows")
    acc = acc_dtype(dtype)
    _, entropy, lse = ops.lle_forward(h, W, b, y, it, True)
    g, e = torch.randn(n, dtype=acc), torch.randn(n, dtype=acc)
    torch.library.opcheck(ops.lle_backward.default, (g, e, h, W, b, y, it, lse, entropy))
    torch.library.opcheck(ops.lle_backward.default, (g, None, h, W, b, y, it, lse, entropy))


def test_torch_compile_fullgraph():
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

    # autograd through the compiled op (register_autograd's backward calls lle_backward)
    def loss(h, W, b):
        lp, ent, _ = ops.lle_forward(h, W, b, y, it, True)
        return (lp * g + ent * e).sum()

    hs, Ws, bs = (t.clone().requires_grad_(True) for t in (h, W, b))
    loss(hs, Ws, bs).backward()
    hc, Wc, bc = (t.clone().requires_grad_(True) for t in (h, W, b))
    torch.compile(loss, fullgraph=True, backend="aot_eager")(hc, Wc, bc).backward()
    for a, c in zip((hc.grad, Wc.grad, bc.grad), (hs.grad, Ws.grad, bs.grad)):
        torch.testing.assert_close(a, c)
    torch._dynamo.reset()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compute_entropy", [True, False])
def test_gradcheck_float64(bias, compute_entropy, tiles):
    n, D, V = 4, 5, 70
    h, W, b, y, it = make_inputs(n, D, V, torch.float64, bias=bias, temp="rows")
    inputs = (h.requires_grad_(True), W.requires_grad_(True)) + ((b.requires_grad_(True),) if bias else ())

    def f(h, W, *maybe_b):
        # all three outputs, so the lse gradient path of the autograd formula is checked too
        return ops.lle_forward(h, W, maybe_b[0] if maybe_b else None, y, it, compute_entropy)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the backend objects and the public API


def test_backend_objects():
    assert cpp.BACKENDS["cpu"].unavailable_reason(torch.device("cpu")) is None
    assert cpp.BACKENDS["cpu"].unavailable_reason(torch.device("meta")) is not None
    cuda_reason = cpp.BACKENDS["cuda"].unavailable_reason(torch.device("cuda"))
    assert (cuda_reason is None) == cpp.has_cuda_kernels()
    assert cpp.BACKENDS["cuda"].unavailable_reason(torch.device("cpu")) is not None

    h, W, b, y, it = make_inputs(5, 6, 90, bias=True, temp="rows")
    backend = cpp.BACKENDS["cpu"]
    lp, ent, lse = backend.forward(h, W, b, y, it, KernelParams(compute_entropy=True))
    g, e = torch.randn(5), torch.randn(5)
    grad_h, grad_w, grad_b = backend.backward(g, e, h, W, b, y, it, lse, ent, KernelParams())
    ref = reference(h, W, b, y, it, g, e)
    assert_close(grad_h, ref[3], 2e-5)
    assert_close(grad_b, ref[5], 2e-5)
    _, _, grad_none = backend.backward(g, e, h, W, None, y, it, lse, ent, KernelParams())
    assert grad_none is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_cpu_matches_reference(dtype):
    pk = pytest.importorskip("prepo_kernels")
    if not hasattr(pk, "linear_logprob_entropy"):
        pytest.skip("public API not present")
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 24, generator=gen).to(dtype)
    weight = (torch.randn(1111, 24, generator=gen) / 5).to(dtype)
    bias = torch.randn(1111, generator=gen).to(dtype)
    targets = torch.randint(0, 1111, (2, 9), generator=gen)
    targets[0, :3] = -100
    temperature = 0.5 + torch.rand(2, 9, generator=gen)
    results = {}
    for impl in ("cpu", "reference"):
        hs, ws, bs = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        lp, ent = pk.linear_logprob_entropy(hs, ws, targets, bias=bs, temperature=temperature, impl=impl)
        (lp.sum() + 0.3 * ent.sum()).backward()
        results[impl] = (lp, ent, hs.grad, ws.grad, bs.grad)
    rtol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, c in zip(results["cpu"], results["reference"]):
        torch.testing.assert_close(a.float(), c.float(), rtol=rtol, atol=rtol)
