"""Every fused CPU backend against the float64 reference, values and gradients."""
import pytest
import torch

from conftest import fused_cpu_impls
from prepo_kernels import linear_logprob_entropy

IMPLS = fused_cpu_impls()
F64 = torch.float64


def make_inputs(n, d, vocab, *, dtype=F64, bias=False, scale=1.0, ignore_frac=0.0, lead=None):
    shape = (n,) if lead is None else lead
    hidden = torch.randn(*shape, d, dtype=F64)
    weight = torch.randn(vocab, d, dtype=F64) * scale / d**0.5
    b = torch.randn(vocab, dtype=F64) if bias else None
    targets = torch.randint(0, vocab, shape)
    targets[torch.rand(shape) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets, cast(b)


def run(impl, hidden, weight, targets, bias, temperature=1.0, grads=None):
    """Outputs and (hidden, weight, bias) gradients of sum(g * logprob + e * entropy)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = linear_logprob_entropy(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, impl=impl)
    g, e = grads if grads is not None else (torch.randn_like(lp), torch.randn_like(lp))
    ((lp * g).sum() + (ent * e).sum()).backward()
    return [lp.detach(), ent.detach()] + [t.grad for t in leaves if t is not None]


def assert_close_to_truth(impl, dtype, *inputs, temperature=1.0, tol=1e-6):
    """|truth - impl| <= |truth - reference in the same dtype| + tol, elementwise."""
    hidden, weight, targets, bias = inputs
    grads = (torch.randn(targets.shape, dtype=F64), torch.randn(targets.shape, dtype=F64))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    truth = run("reference", hidden, weight, targets, bias, temperature, grads)
    low = (cast(hidden), cast(weight), targets, cast(bias))
    g32 = tuple(g.float() if dtype != F64 else g for g in grads)
    ref_low = run("reference", *low, temperature, g32)
    got = run(impl, *low, temperature, g32)
    for name, t, r, x in zip(("logprob", "entropy", "d_hidden", "d_weight", "d_bias"), truth, ref_low, got):
        err_ref = (t - r.to(F64)).abs()
        err = (t - x.to(F64)).abs()
        bound = err_ref + tol * (1 + t.abs())
        assert torch.all(err <= bound), f"{impl} {name}: max excess {(err - bound).max().item():.3g}"


SHAPES = [
    (1, 8, 50),  # one token, V smaller than any tile
    (7, 13, 1000),  # odd D
    (33, 16, 9000),  # V not a multiple of the 8192 tile
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,vocab", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_float64_matches_reference(impl, n, d, vocab, bias):
    inputs = make_inputs(n, d, vocab, bias=bias, scale=3.0, ignore_frac=0.2)
    assert_close_to_truth(impl, F64, *inputs, tol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_reference_error(impl, dtype):
    inputs = make_inputs(24, 32, 700, bias=True, scale=4.0, ignore_frac=0.1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close_to_truth(impl, dtype, *inputs, tol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_temperature_and_leading_dims(impl):
    inputs = make_inputs(None, 12, 300, lead=(3, 5), bias=True, ignore_frac=0.2)
    temperature = torch.rand(3, 5, dtype=F64) + 0.3
    assert_close_to_truth(impl, F64, *inputs, temperature=temperature, tol=1e-9)
    lp, ent = linear_logprob_entropy(inputs[0], inputs[1], inputs[2], impl=impl, temperature=0.7)
    assert lp.shape == ent.shape == (3, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits(impl):
    # |z| around 1e4: lse and sum p z nearly cancel in a naive entropy
    hidden, weight, targets, _ = make_inputs(9, 8, 257)
    weight = weight * (1e4 / (hidden @ weight.T).abs().max())
    assert_close_to_truth(impl, F64, hidden, weight, targets, None, tol=1e-9)
    lp, ent = linear_logprob_entropy(hidden.float(), weight.float(), targets, impl=impl)
    assert torch.isfinite(lp).all() and (lp <= 0).all() and (ent >= -1e-3).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_bias_gives_no_nan(impl):
    hidden, weight, targets, bias = make_inputs(10, 8, 100, bias=True)
    bias[::3] = float("-inf")
    targets = torch.where(targets % 3 == 0, targets + 1, targets)
    outs = run(impl, hidden, weight, targets, bias)
    for t in outs:
        assert not torch.isnan(t).any()
    assert_close_to_truth(impl, F64, hidden, weight, targets, bias, tol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_are_zero_and_get_no_gradient(impl):
    hidden, weight, targets, _ = make_inputs(12, 8, 64)
    targets[[0, 5, 11]] = -100
    lp, ent, grad_h, _ = run(impl, hidden, weight, targets, None)
    for t in (lp, ent):
        assert (t[[0, 5, 11]] == 0).all()
    assert (grad_h[[0, 5, 11]] == 0).all()
    hidden_all, weight_all, targets_all, _ = make_inputs(4, 8, 64)
    lp, ent, grad_h, grad_w = run(impl, hidden_all, weight_all, torch.full_like(targets_all, -100), None)
    assert (lp == 0).all() and (ent == 0).all() and grad_h is None and grad_w is None


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gradient_rows_are_exact(impl):
    """Rows with zero upstream gradient are skipped in backward; results equal the full computation."""
    hidden, weight, targets, bias = make_inputs(16, 8, 120, bias=True)
    g, e = torch.randn(16, dtype=F64), torch.randn(16, dtype=F64)
    g[::2] = 0
    e[::2] = 0
    got = run(impl, hidden, weight, targets, bias, grads=(g, e))
    truth = run("reference", hidden, weight, targets, bias, grads=(g, e))
    for x, t in zip(got, truth):
        torch.testing.assert_close(x, t, rtol=1e-9, atol=1e-9)
    assert (got[2][::2] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_compute_entropy_false(impl):
    hidden, weight, targets, _ = make_inputs(5, 8, 40)
    w = weight.clone().requires_grad_()
    lp, ent = linear_logprob_entropy(hidden, w, targets, compute_entropy=False, impl=impl)
    assert ent is None
    lp.sum().backward()
    w_ref = weight.clone().requires_grad_()
    lp_ref, _ = linear_logprob_entropy(hidden, w_ref, targets, impl="reference")
    lp_ref.sum().backward()
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    hidden, weight, targets, bias = make_inputs(4, 5, 11, bias=True)
    targets[1] = -100
    temperature = torch.tensor([0.5, 1.0, 2.0, 1.3], dtype=F64)

    def f(h, w, b):
        lp, ent = linear_logprob_entropy(h, w, targets, bias=b, temperature=temperature, impl=impl)
        return lp, ent

    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(f, args)


def test_a_wrong_backend_fails_this_suite(monkeypatch):
    """The comparison can fail: perturb one entropy and the checker notices."""
    from prepo_kernels.backends import torch_chunked

    original = torch_chunked.forward

    def broken(*args):
        lp, ent, lse = original(*args)
        return lp, ent + 1e-3, lse

    monkeypatch.setattr(torch_chunked.TorchChunkedBackend, "forward", staticmethod(broken))
    with pytest.raises(AssertionError, match="entropy"):
        assert_close_to_truth("torch", F64, *make_inputs(3, 4, 10), tol=1e-9)
