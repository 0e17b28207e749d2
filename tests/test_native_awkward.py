"""The native CPU ops on the awkward shapes and values the sanitizer run (.ci/run_sanitize) must see:
one row, V smaller than / not a multiple of the vocab tile, odd D (the bf16 upcast fallback), every
row ignored, every upstream gradient zero, huge |logits|, -inf bias entries; each with the default
tiles and with tiny ones (ragged last tiles, several row blocks and partitions), in every dtype.

Small shapes, so that they also run quickly under AddressSanitizer; the values are checked against
the float64 oracle too (loosely: the precise accuracy tests are test_cpp_ops.py and test_kernels.py).
"""
import pytest
import torch

pytest.importorskip("prepo_kernels._C", reason="native extension prepo_kernels._C not built")

from kernel_harness import raw_oracle  # noqa: E402
from prepo_kernels import linear_logprob_entropy  # noqa: E402
from prepo_kernels.backends import cpp  # noqa: E402,F401  (registers the fake kernels)

ops = torch.ops.prepo_kernels
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# name: (n, D, V, bias, what)
CASES = {
    "one row": (1, 8, 5, False, ""),
    "V not a tile multiple": (9, 16, 1031, True, ""),
    "odd D": (7, 13, 130, True, ""),
    "huge logits": (6, 4, 300, True, "huge"),
    "-inf bias": (8, 6, 257, True, "neg_inf"),
    "all -inf but the target": (3, 5, 70, True, "one_finite"),
}


@pytest.fixture(params=["default tiles", "tiny tiles"])
def tiles(request, monkeypatch):
    if request.param == "tiny tiles":
        monkeypatch.setenv("PREPO_CPU_VOCAB_TILE", "16")
        monkeypatch.setenv("PREPO_CPU_ROW_TILE", "2")


def make(n, D, V, bias, what, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, dtype=torch.float64, generator=gen)
    W = torch.randn(V, D, dtype=torch.float64, generator=gen) / D**0.5
    b = torch.randn(V, dtype=torch.float64, generator=gen) if bias else None
    y = torch.randint(0, V, (n,), generator=gen)
    if what == "huge":  # |z| ~ 1e4 through the bias, spread ~ 3
        b = b + 1e4
        W = W * 3
    if what == "neg_inf":
        b[torch.rand(V, generator=gen) < 0.5] = float("-inf")
        b[y] = 0.0
    if what == "one_finite":
        b[:] = float("-inf")
        b[y] = 0.0
    it = 0.5 + torch.rand(n, dtype=torch.float64, generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(W), cast(b), y, it.to(acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_raw_ops(case, dtype, tiles):
    h, W, b, y, it = make(*CASES[case], dtype)
    n = h.shape[0]
    logprob, entropy, lse = ops.lle_forward(h, W, b, y, it, True)
    g, e = torch.randn(n, dtype=it.dtype), torch.randn(n, dtype=it.dtype)
    grads = ops.lle_backward(g, e, h, W, b, y, it, lse, entropy)
    zero = torch.zeros_like(g)
    zero_grads = ops.lle_backward(zero, zero, h, W, b, y, it, lse, entropy)  # every gradient zero
    assert all((t == 0).all() for t in zero_grads if t.numel())
    want = raw_oracle(h, W, b, y, it, g, e)
    tol = 1e-9 if dtype == torch.float64 else 2e-2
    for name, got, ref in zip(("logprob", "entropy", "lse", "d_hidden", "d_weight", "d_bias"),
                              (logprob, entropy, lse) + tuple(grads), want):
        if ref is None:
            continue
        assert torch.isfinite(got).all(), name
        scale = 1 + ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_api_ignored_and_zero_gradient_rows(dtype, tiles):
    """Through the autograd op: every row ignored (the native op sees no rows), then every upstream
    gradient zero (backward skips every row), then a mix."""
    h, W, b, y, _ = make(12, 7, 100, True, "", dtype)
    leaves = [t.clone().requires_grad_() for t in (h, W, b)]
    lp, ent = linear_logprob_entropy(*leaves[:2], torch.full((12,), -100), bias=leaves[2], impl="cpu")
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and all((t.grad == 0).all() for t in leaves)
    for t in leaves:
        t.grad = None
    lp, ent = linear_logprob_entropy(*leaves[:2], y, bias=leaves[2], temperature=0.7, impl="cpu")
    (lp * 0 + ent * 0).sum().backward()
    assert all((t.grad == 0).all() for t in leaves)
    y_mixed = y.clone()
    y_mixed[::3] = -100
    lp, ent = linear_logprob_entropy(h, W, y_mixed, bias=b, impl="cpu")
    assert (lp[::3] == 0).all() and torch.isfinite(lp).all() and torch.isfinite(ent).all()
