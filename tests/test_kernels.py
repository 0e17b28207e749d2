"""Every fused backend, on every device it runs on, through the public API against the float64
reference (criterion in kernel_harness): values and gradients, awkward shapes, every dtype.

Parametrized over (backend, device) from kernel_harness.FUSED_BACKEND_DEVICES: here torch/cpu on
CPU and triton through its interpreter; on a GPU machine also torch/triton/cuda on CUDA (marker
``gpu``). Backend-specific tests (native tiles and determinism, triton launchers and gradient
filter) live in test_cpp_ops.py and test_triton.py and use the same harness.
"""
import pytest
import torch

from kernel_harness import (F64, FUSED_BACKEND_DEVICES, assert_close_to_truth, interpreter_warnings,
                            make_inputs, random_grads, run, skip_reason)
from prepo_kernels import KernelParams, linear_logprob_entropy
from prepo_kernels.autograd import fused_lle, fused_lle_backward

pytestmark = interpreter_warnings
LOW = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

SHAPES = [
    (1, 8, 50),  # one token, V smaller than any tile
    (7, 13, 300),  # odd D, V not a multiple of a tile
    (40, 48, 129),  # V one past a tile multiple, several row blocks
]


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
@pytest.mark.parametrize("n,d,vocab", SHAPES)
def test_float64_matches_reference(impl, device, n, d, vocab):
    hidden, weight, targets, bias = make_inputs(n, d, vocab, bias=True, ignore_frac=0.2 if n > 1 else 0.0)
    temperature = torch.rand(n, dtype=F64) + 0.4  # per-token temperature
    assert_close_to_truth(impl, device, F64, hidden, weight, targets, bias, temperature=temperature)


def test_large_vocab_tiles():
    """V above the torch backend's 8192-wide vocab tile, not a multiple of it (CPU backends only:
    the interpreter is too slow for it, the GPU suite covers large V for triton/cuda)."""
    inputs = make_inputs(33, 16, 9000, bias=True, ignore_frac=0.2)
    for impl in ("torch", "cpu"):
        if skip_reason(impl, "cpu") is None:
            assert_close_to_truth(impl, "cpu", F64, *inputs)


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", list(LOW))
def test_low_precision_within_reference_error(impl, device, dtype):
    hidden, weight, targets, bias = make_inputs(24, 32, 200, bias=True, scale=4.0, ignore_frac=0.1)
    temperature = torch.rand(24, dtype=F64) + 0.5
    assert_close_to_truth(impl, device, dtype, hidden, weight, targets, bias, temperature=temperature,
                          tol=LOW[dtype])


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
@pytest.mark.parametrize("deterministic,grad_filter", [(True, False), (False, True)])
def test_kernel_params(impl, device, deterministic, grad_filter):
    """Every backend honours (or ignores, where it has no such mode) each KernelParams field."""
    hidden, weight, targets, bias = make_inputs(16, 24, 150, bias=True, ignore_frac=0.1)
    params = KernelParams(deterministic=deterministic, grad_filter=grad_filter)
    assert_close_to_truth(impl, device, F64, hidden, weight, targets, bias, params=params)
    assert_close_to_truth(impl, device, torch.bfloat16, hidden, weight, targets, bias, params=params, tol=1e-2)


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
def test_leading_dims_and_scalar_temperature(impl, device):
    hidden, weight, targets, bias = make_inputs(None, 12, 100, lead=(3, 5), bias=True, ignore_frac=0.2)
    got = assert_close_to_truth(impl, device, F64, hidden, weight, targets, bias, temperature=0.7)
    assert got[0].shape == got[1].shape == (3, 5)


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
def test_extreme_logits(impl, device):
    """|z| ~ 1e4: lse and sum p z nearly cancel in a naive entropy."""
    hidden, weight, targets, _ = make_inputs(9, 8, 257)
    weight = weight * (1e4 / (hidden @ weight.T).abs().max())
    assert_close_to_truth(impl, device, F64, hidden, weight, targets, None)
    got = assert_close_to_truth(impl, device, torch.float32, hidden, weight, targets, None, tol=1e-5)
    assert (got[0] <= 0).all() and (got[1] >= -1e-3).all()


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
def test_minus_inf_bias_gives_no_nan(impl, device):
    hidden, weight, targets, bias = make_inputs(10, 8, 100, bias=True)
    bias[::3] = float("-inf")
    bias[64:] = float("-inf")  # a whole 64-wide vocab tile of -inf
    targets = torch.where(targets % 3 == 0, targets + 1, targets).clamp(max=63)
    targets = torch.where(targets % 3 == 0, targets - 1, targets)
    for dtype in (F64, torch.float32):
        got = assert_close_to_truth(impl, device, dtype, hidden, weight, targets, bias, tol=1e-5)
        assert not any(torch.isnan(t).any() for t in got)
        d_weight, d_bias = got[3], got[4]
        assert (d_bias[::3] == 0).all() and (d_weight[64:] == 0).all()


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
def test_ignored_and_zero_gradient_rows(impl, device):
    """Rows the autograd op drops (ignored targets in forward, zero upstream gradients in backward)
    get exactly 0; the others are unchanged."""
    hidden, weight, targets, bias = make_inputs(16, 8, 120, bias=True)
    targets[[0, 5, 11]] = -100
    g, e = random_grads(16)
    g[::2] = 0
    e[::2] = 0
    lp, ent, d_hidden = assert_close_to_truth(impl, device, F64, hidden, weight, targets, bias, grads=(g, e))[:3]
    assert (lp[[0, 5, 11]] == 0).all() and (ent[[0, 5, 11]] == 0).all()
    assert (d_hidden[[0, 5, 11]] == 0).all() and (d_hidden[::2] == 0).all()
    # every target ignored: zeros, and zero gradients
    lp, ent, d_hidden, d_weight = run(impl, device, F64, hidden, weight, torch.full((16,), -100), None,
                                      grads=(g, e))
    assert (lp == 0).all() and (ent == 0).all() and (d_hidden == 0).all() and (d_weight == 0).all()


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
def test_compute_entropy_false(impl, device):
    hidden, weight, targets, bias = make_inputs(6, 8, 70, bias=True, ignore_frac=0.2)
    assert_close_to_truth(impl, device, F64, hidden, weight, targets, bias, compute_entropy=False)
    lp, ent = linear_logprob_entropy(hidden.to(device), weight.to(device), targets.to(device), impl=impl,
                                     compute_entropy=False)
    assert ent is None and lp.shape == (6,)


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
def test_gradcheck(impl, device):
    hidden, weight, targets, bias = make_inputs(3, 4, 17, bias=True, device=device)
    targets[1] = -100
    temperature = torch.tensor([0.5, 1.0, 2.0], dtype=F64, device=device)

    def f(h, w, b):
        return linear_logprob_entropy(h, w, targets, bias=b, temperature=temperature, impl=impl)

    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    # the interpreter is slow: triton on CPU checks random projections of the Jacobian
    assert torch.autograd.gradcheck(f, args, fast_mode=(impl == "triton" and device == "cpu"))


@pytest.mark.parametrize("impl,device", FUSED_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_fused_ops(impl, device, dtype):
    """torch.library.opcheck of the autograd ops (schema, fake kernels, autograd registration,
    AOT dispatch) on this device's dispatch key."""
    hidden, weight, targets, bias = make_inputs(6, 8, 40, bias=True, ignore_frac=0.3, dtype=dtype, device=device)
    inv_temp = torch.rand(6, device=device) + 0.5
    config = (-100, impl, True, False, True, "")  # ..., group_name: unsharded
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    torch.library.opcheck(fused_lle, (*leaves, targets, inv_temp, *config))
    _, entropy, lse = fused_lle(hidden, weight, bias, targets, inv_temp, *config)
    g, e = (torch.randn(6, device=device) for _ in range(2))
    g[0] = e[0] = 0
    torch.library.opcheck(fused_lle_backward, (g, e, hidden, weight, bias, targets, inv_temp, lse, entropy, *config))


def test_a_wrong_backend_fails_this_suite(monkeypatch):
    """The criterion can fail: perturb one entropy and the checker notices."""
    from prepo_kernels.backends import torch_chunked

    original = torch_chunked.forward

    def broken(*args):
        lp, ent, lse = original(*args)
        return lp, ent + 1e-3, lse

    monkeypatch.setattr(torch_chunked.TorchChunkedBackend, "forward", staticmethod(broken))
    with pytest.raises(AssertionError, match="entropy"):
        assert_close_to_truth("torch", "cpu", F64, *make_inputs(3, 4, 10))
