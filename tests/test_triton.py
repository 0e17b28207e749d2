"""The triton backend against the float64 reference: values and gradients, forward and backward.

Runs twice over where it can: on CPU through Triton's interpreter (TRITON_INTERPRET=1, set below
when no CUDA device is present) and natively on a CUDA device (tests parametrized by device; the
cuda cases carry the ``gpu`` marker, so ``pytest -m gpu`` selects them on a GPU machine).

triton.jit decides interpreter-vs-compiled when a kernel is *defined* (it reads
``triton.knobs.runtime.interpret`` from TRITON_INTERPRET in its decorator), i.e. when
``prepo_kernels.triton`` is first imported. Nothing imports that package before the backend's first
forward call, so setting the variable here at module import is early enough.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from prepo_kernels import KernelParams, linear_logprob_entropy  # noqa: E402
from prepo_kernels.backends import registry  # noqa: E402
from prepo_kernels.backends.triton_backend import BACKENDS  # noqa: E402

# the interpreter evaluates both sides of every tl.where; masked-out 0 * inf and log(0) warn in numpy
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

F64 = torch.float64
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (and no TRITON_INTERPRET)")]),
]


def make_inputs(n, d, vocab, *, bias=False, scale=3.0, ignore_frac=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, dtype=F64, generator=gen)
    weight = torch.randn(vocab, d, dtype=F64, generator=gen) * scale / d**0.5
    b = torch.randn(vocab, dtype=F64, generator=gen) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hidden, weight, targets, b


def run(impl, device, dtype, hidden, weight, targets, bias, *, temperature=1.0, grads=None, params=None,
        compute_entropy=True):
    """Outputs and (hidden, weight, bias) gradients of sum(g * logprob + e * entropy), on CPU in float64."""
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).detach().requires_grad_()  # noqa: E731
    leaves = [cast(t) for t in (hidden, weight, bias)]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(device=device, dtype=F64 if dtype == F64 else torch.float32)
    lp, ent = linear_logprob_entropy(leaves[0], leaves[1], targets.to(device), bias=leaves[2],
                                     temperature=temperature, impl=impl, params=params,
                                     compute_entropy=compute_entropy)
    g, e = grads
    gd = F64 if dtype == F64 else torch.float32
    loss = (lp * g.to(device, gd)).sum()
    if compute_entropy:
        loss = loss + (ent * e.to(device, gd)).sum()
    loss.backward()
    outs = [lp, ent] if compute_entropy else [lp]
    outs += [t.grad for t in leaves if t is not None]
    return [None if t is None else t.detach().to("cpu", F64) for t in outs]


NAMES_E = ("logprob", "entropy", "d_hidden", "d_weight", "d_bias")
NAMES = ("logprob", "d_hidden", "d_weight", "d_bias")


def assert_close_to_truth(device, dtype, hidden, weight, targets, bias, *, temperature=1.0, tol=1e-9,
                          params=None, grads=None, compute_entropy=True):
    """|truth - triton| <= |truth - reference in the same dtype| + tol * (1 + |truth|), elementwise;
    truth is the float64 reference on the float64 inputs."""
    n = targets.shape[0]
    if grads is None:
        gen = torch.Generator().manual_seed(1)
        grads = (torch.randn(n, dtype=F64, generator=gen), torch.randn(n, dtype=F64, generator=gen))
    low = tuple(None if t is None else t.to(dtype).to(F64) for t in (hidden, weight, bias))  # rounded inputs
    truth = run("reference", "cpu", F64, hidden, weight, targets, bias, temperature=temperature, grads=grads,
                compute_entropy=compute_entropy)
    if dtype == F64:
        ref_low = truth
    else:
        ref_low = run("reference", "cpu", dtype, *low[:2], targets, low[2], temperature=temperature, grads=grads,
                      compute_entropy=compute_entropy)
    got = run("triton", device, dtype, *low[:2], targets, low[2], temperature=temperature, grads=grads,
              params=params, compute_entropy=compute_entropy)
    names = NAMES_E if compute_entropy else NAMES
    for name, t, r, x in zip(names, truth, ref_low, got):
        assert torch.isfinite(x).all() or not torch.isfinite(t).all(), f"triton {name}: non-finite values"
        err_ref = (t - r).abs()
        err = (t - x).abs()
        bound = err_ref + tol * (1 + t.abs())
        assert torch.all(err <= bound), f"triton {dtype} {name}: max excess {(err - bound).max().item():.3g}"
    return got


# --------------------------------------------------------------------------------------------------
# float64: exact agreement with the reference on awkward shapes

SHAPES = [
    (1, 8, 50),  # one token, V smaller than a tile
    (7, 13, 300),  # odd D, V not a multiple of the tile
    (40, 48, 129),  # V one past a tile multiple
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,vocab", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_float64_matches_reference(device, n, d, vocab, deterministic):
    hidden, weight, targets, bias = make_inputs(n, d, vocab, bias=True, ignore_frac=0.2 if n > 1 else 0.0)
    temperature = torch.rand(n, dtype=F64) + 0.4  # per-token temperature
    assert_close_to_truth(device, F64, hidden, weight, targets, bias, temperature=temperature,
                          params=KernelParams(deterministic=deterministic))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    hidden, weight, targets, bias = make_inputs(3, 4, 17, bias=True)
    targets[1] = -100
    temperature = torch.tensor([0.5, 1.0, 2.0], dtype=F64, device=device)
    targets = targets.to(device)

    def f(h, w, b):
        return linear_logprob_entropy(h, w, targets, bias=b, temperature=temperature, impl="triton")

    args = [t.to(device).clone().requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    """|z| ~ 1e4: running max starts at -inf and rescales without overflow; entropy stays ~0 and finite."""
    hidden, weight, targets, _ = make_inputs(9, 8, 257)
    weight = weight * (1e4 / (hidden @ weight.T).abs().max())
    assert_close_to_truth(device, F64, hidden, weight, targets, None)
    got = assert_close_to_truth(device, torch.float32, hidden, weight, targets, None, tol=1e-5)
    assert (got[0] <= 0).all() and (got[1] >= -1e-3).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_minus_inf_bias_gives_no_nan(device, deterministic):
    hidden, weight, targets, bias = make_inputs(10, 8, 100, bias=True)
    bias[::3] = float("-inf")
    bias[64:] = float("-inf")  # a whole vocab tile of -inf
    targets = torch.where(targets % 3 == 0, targets + 1, targets).clamp(max=63)
    targets = torch.where(targets % 3 == 0, targets - 1, targets)
    for dtype in (F64, torch.float32):
        got = assert_close_to_truth(device, dtype, hidden, weight, targets, bias,
                                    params=KernelParams(deterministic=deterministic), tol=1e-5)
        for t in got:
            assert not torch.isnan(t).any()
        d_weight, d_bias = got[3], got[4]
        assert (d_bias[::3] == 0).all() and (d_weight[64:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_compute_entropy_false(device):
    hidden, weight, targets, bias = make_inputs(6, 8, 70, bias=True)
    assert_close_to_truth(device, F64, hidden, weight, targets, bias, compute_entropy=False)


# --------------------------------------------------------------------------------------------------
# low precision: no worse than the reference in the same dtype (plus a small tolerance)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_filter", [False, True])
def test_low_precision_within_reference_error(device, dtype, grad_filter):
    hidden, weight, targets, bias = make_inputs(24, 32, 200, bias=True, scale=4.0, ignore_frac=0.1)
    temperature = torch.rand(24, dtype=F64) + 0.5
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert_close_to_truth(device, dtype, hidden, weight, targets, bias, temperature=temperature,
                          tol=tol, params=KernelParams(grad_filter=grad_filter))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_split_merge_matches_single_pass(device):
    """Splitting the vocabulary over programs and merging partial stats gives the same values."""
    from prepo_kernels.triton import triton_forward

    hidden, weight, targets, bias = make_inputs(5, 16, 300, bias=True)
    bias[:40] = float("-inf")  # a split whose slice is entirely -inf for every row
    targets = targets.clamp(min=40)
    args = [t.to(device) for t in (hidden, weight, bias, targets)]
    inv_temp = (torch.rand(5, dtype=F64) + 0.5).to(device)
    base = triton_forward(args[0], args[1], args[2], args[3], inv_temp, num_splits=1)
    truth = run("reference", "cpu", F64, hidden, weight, targets, bias, temperature=1 / inv_temp.cpu(),
                grads=(torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)))
    torch.testing.assert_close(base[0].cpu(), truth[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base[1].cpu(), truth[1], rtol=1e-12, atol=1e-12)
    from prepo_kernels.triton.config import Blocks

    for splits in (2, 3, 10):
        got = triton_forward(args[0], args[1], args[2], args[3], inv_temp, num_splits=splits,
                             blocks=Blocks(16, 32, 16))
        for a, b in zip(base, got):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    lp, ent, lse = triton_forward(args[0], args[1], args[2], args[3], inv_temp, compute_entropy=False,
                                  num_splits=3, blocks=Blocks(16, 32, 16))
    assert ent.numel() == 0
    torch.testing.assert_close(lp, base[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_many_small_tiles(device, deterministic):
    """Launchers called directly with 16-wide blocks: many row blocks (more than the fused kernel's
    GROUP_N=8, with a partial last group), many vocab tiles, several D chunks, several splits."""
    from prepo_kernels.triton import triton_backward, triton_forward
    from prepo_kernels.triton.config import Blocks

    n, d, vocab = 150, 40, 70
    hidden, weight, targets, bias = make_inputs(n, d, vocab, bias=True)
    inv_t = torch.rand(n, dtype=F64) + 0.5
    grads = (torch.randn(n, dtype=F64), torch.randn(n, dtype=F64))
    truth = run("reference", "cpu", F64, hidden, weight, targets, bias, temperature=1 / inv_t, grads=grads)
    dev = torch.device(device)
    h, w, b, y, it = (t.to(dev) for t in (hidden, weight, bias, targets, inv_t))
    blocks = Blocks(16, 16, 16)
    for splits in (1, 3):
        lp, ent, lse = triton_forward(h, w, b, y, it, num_splits=splits, blocks=blocks)
        torch.testing.assert_close(lp.cpu(), truth[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent.cpu(), truth[1], rtol=1e-12, atol=1e-12)
    g, e = (t.to(dev) for t in grads)
    dh, dw, db = triton_backward(g, e, h, w, b, y, it, lse, ent, deterministic=deterministic, blocks=blocks)
    for got, want in zip((dh, dw, db), truth[2:]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    # no entropy gradient (compute_entropy=False path): only the logprob part
    dh, dw, db = triton_backward(g, None, h, w, b, y, it, lse, torch.empty(0, dtype=F64, device=dev),
                                 deterministic=deterministic, blocks=blocks)
    truth_lp = run("reference", "cpu", F64, hidden, weight, targets, bias, temperature=1 / inv_t,
                   grads=(grads[0], torch.zeros(n, dtype=F64)))
    for got, want in zip((dh, dw, db), truth_lp[2:]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# modes: deterministic, gradient filter

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_is_bitwise_reproducible(device, dtype):
    hidden, weight, targets, bias = make_inputs(40, 24, 150, bias=True)
    grads = (torch.randn(40, dtype=F64), torch.randn(40, dtype=F64))
    params = KernelParams(deterministic=True)
    a = run("triton", device, dtype, hidden, weight, targets, bias, grads=grads, params=params)
    b = run("triton", device, dtype, hidden, weight, targets, bias, grads=grads, params=params)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    fast = run("triton", device, dtype, hidden, weight, targets, bias, grads=grads, params=KernelParams())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x, y in zip(a, fast):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _peaked_inputs():
    """Vocab columns 64.. have bias -25: probabilities ~1e-11, far under the bf16 filter bound."""
    hidden, weight, targets, bias = make_inputs(20, 16, 256, bias=True, scale=1.0)
    bias[64:] = -25.0
    targets = targets % 64
    return hidden, weight, targets, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_filter_skips_negligible_tiles_in_16bit_only(device, deterministic):
    hidden, weight, targets, bias = _peaked_inputs()
    grads = (torch.randn(20, dtype=F64), torch.randn(20, dtype=F64))
    from prepo_kernels.triton.backward import triton_backward
    from prepo_kernels.triton.config import Blocks, filter_budget

    # call the launcher directly with 64-wide vocab tiles so columns 64.. form whole tiles
    dev = torch.device(device)
    for dtype, expect_skip in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
        h, w, b = (t.to(dev, dtype) for t in (hidden, weight, bias))
        y = targets.to(dev)
        inv_t = torch.ones(20, device=dev)
        lp, ent, lse = linear_stats(h, w, b, y, inv_t)
        g, e = (t.to(dev, torch.float32) for t in grads)
        blocks = Blocks(16, 64, 16)
        on = triton_backward(g, e, h, w, b, y, inv_t, lse, ent, deterministic=deterministic, grad_filter=True,
                             blocks=blocks)
        off = triton_backward(g, e, h, w, b, y, inv_t, lse, ent, deterministic=deterministic, grad_filter=False,
                              blocks=blocks)
        if dtype != torch.float16:  # (fp16 dz of ~1e-11 underflows to 0 anyway when cast for the dot)
            assert (off[1][64:] != 0).any() and (off[2][64:] != 0).all()
        if expect_skip:
            assert filter_budget(dtype, 256, 64) > 0
            assert (on[1][64:] == 0).all() and (on[2][64:] == 0).all()  # those tiles were skipped
        else:
            for x, y_ in zip(on, off):
                assert torch.equal(x, y_)  # no filtering for fp32
        # whatever was dropped is within the documented bound: u * (|g|+|e|) * inv_t * max|W| per row
        u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[dtype]
        scale = (g.abs() + e.abs()) * inv_t
        err_h = (on[0] - off[0]).abs().amax(1)
        assert torch.all(err_h <= u * scale * w.float().abs().max() + 1e-6)
    # and through the public API the filtered bf16 gradients still satisfy the accuracy rule
    assert_close_to_truth(device, torch.bfloat16, hidden, weight, targets, bias, tol=1e-2, grads=grads,
                          params=KernelParams(grad_filter=True, deterministic=deterministic))


def linear_stats(h, w, b, y, inv_t):
    from prepo_kernels.triton import triton_forward

    return triton_forward(h, w, b, y, inv_t)


# --------------------------------------------------------------------------------------------------
# rows the autograd layer drops before the backend sees them

@pytest.mark.parametrize("device", DEVICES)
def test_ignored_and_zero_gradient_rows(device):
    hidden, weight, targets, bias = make_inputs(16, 8, 120, bias=True)
    targets[[0, 5, 11]] = -100
    g, e = torch.randn(16, dtype=F64), torch.randn(16, dtype=F64)
    g[::2] = 0
    e[::2] = 0
    got = assert_close_to_truth(device, F64, hidden, weight, targets, bias, grads=(g, e))
    lp, ent, d_hidden = got[:3]
    assert (lp[[0, 5, 11]] == 0).all() and (ent[[0, 5, 11]] == 0).all()
    assert (d_hidden[[0, 5, 11]] == 0).all() and (d_hidden[::2] == 0).all()
    # every target ignored: zeros and no gradient
    h = hidden.to(device).requires_grad_()
    lp, ent = linear_logprob_entropy(h, weight.to(device), torch.full((16,), -100, device=device), impl="triton")
    assert (lp == 0).all() and (ent == 0).all()


# --------------------------------------------------------------------------------------------------
# availability

def test_unavailable_reason(monkeypatch):
    backend = BACKENDS["triton"]
    assert backend.name == "triton"
    assert backend.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = backend.unavailable_reason(torch.device("cpu"))
    assert why is not None and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reason(torch.device("cpu")) is None
    assert registry.unavailable_reason("triton", torch.device("cpu")) is None


# --------------------------------------------------------------------------------------------------
# compiled code, without a GPU: the interpreter accepts programs the compiler may reject

@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the cuda tests compile the kernels for real")
def test_kernels_compile_for_sm90_ahead_of_time():
    """Compile the bf16 kernel variants for sm_90 with the GPU launch configs (triton.compile with a
    GPUTarget, ptxas from the triton wheel) in a subprocess without TRITON_INTERPRET."""
    import subprocess
    import sys
    from pathlib import Path

    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    if not (nvidia / "bin" / "ptxas").exists():
        pytest.skip("triton wheel without the nvidia backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "prepo_kernels.triton.aot_check", "--arch", "90", "--dtypes", "bf16"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all variants compiled" in proc.stdout
