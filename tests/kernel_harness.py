"""The one test harness of the kernel suite: which (backend, device) pairs run here, random inputs,
and the accuracy criterion every backend is held to.

Criterion, elementwise for logprob, entropy and the hidden/weight/bias gradients:
    |truth - impl| <= |truth - reference in impl's dtype| + tol * (1 + |truth|)
where truth is the float64 reference on the (rounded) float64 inputs: a backend may be as wrong as
plain PyTorch in the same dtype, plus a small tolerance, and no more.

Triton runs on CPU through its interpreter: conftest.py sets TRITON_INTERPRET=1 when no CUDA
device is present, before anything imports prepo_kernels (and with it triton).
"""
import pytest
import torch

from prepo_kernels import linear_logprob_entropy
from prepo_kernels.backends import registry
from prepo_kernels.reference import reference_linear_logprob_entropy

F64 = torch.float64
FUSED = ("torch", "cpu", "triton", "cuda")
DEVICES = ("cpu", "cuda")

# the interpreter evaluates both sides of every tl.where; masked-out 0 * inf and log(0) warn in numpy
interpreter_warnings = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512_BF16 or AMX), where the C++ backend runs
    its bf16 GEMMs in bf16 (oneDNN's brgemm) instead of upcasting the tiles to fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def skip_reason(impl: str, device: str):
    """None when backend ``impl`` runs on ``device`` here, else why not."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    return registry.unavailable_reason(impl, torch.device(device))


def backend_param(impl: str, device: str):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    why = skip_reason(impl, device)
    if why is not None:
        marks.append(pytest.mark.skip(reason=why))
    return pytest.param(impl, device, marks=marks, id=f"{impl}-{device}")


def device_params(impl: str):
    """pytest params over the devices backend ``impl`` is meant for, skipped where it cannot run."""
    return [pytest.param(p.values[1], marks=p.marks, id=p.values[1])
            for p in BACKEND_DEVICES if p.values[0] == impl]


# every fused backend on every device it could run on (the ones that cannot run here are skipped,
# saying why); "cuda" is CUDA-only, "cpu" CPU-only
FUSED_BACKEND_DEVICES = [backend_param(i, d) for i in FUSED for d in DEVICES
                         if not (i == "cpu" and d == "cuda") and not (i == "cuda" and d == "cpu")]
BACKEND_DEVICES = [backend_param("reference", "cpu")] + FUSED_BACKEND_DEVICES


def make_inputs(n, d, vocab, *, bias=False, scale=3.0, ignore_frac=0.0, lead=None, seed=0, dtype=F64,
                device="cpu"):
    """(hidden [n or *lead, d], weight [vocab, d], targets, bias [vocab] or None); targets hit
    ignore_index (-100) with probability ``ignore_frac``; logits have spread about ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else tuple(lead)
    hidden = torch.randn(*shape, d, dtype=F64, generator=gen)
    weight = torch.randn(vocab, d, dtype=F64, generator=gen) * scale / d**0.5
    b = torch.randn(vocab, dtype=F64, generator=gen) if bias else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def run(impl, device, dtype, hidden, weight, targets, bias, *, temperature=1.0, grads, params=None,
        compute_entropy=True):
    """[logprob, entropy (if computed), d_hidden, d_weight, d_bias (if bias)] of
    sum(g * logprob + e * entropy), on CPU in float64."""
    cast = lambda t: None if t is None else t.to(device, dtype).detach().requires_grad_()  # noqa: E731
    leaves = [cast(t) for t in (hidden, weight, bias)]
    acc = F64 if dtype == F64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(device, acc)
    lp, ent = linear_logprob_entropy(leaves[0], leaves[1], targets.to(device), bias=leaves[2],
                                     temperature=temperature, impl=impl, params=params,
                                     compute_entropy=compute_entropy)
    g, e = (t.to(device, acc) for t in grads)
    loss = (lp * g).sum() + ((ent * e).sum() if compute_entropy else 0)
    loss.backward()
    outs = ([lp, ent] if compute_entropy else [lp]) + [t.grad for t in leaves if t is not None]
    return [t.detach().to("cpu", F64) for t in outs]


def random_grads(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=F64, generator=gen), torch.randn(shape, dtype=F64, generator=gen)


def assert_close_to_truth(impl, device, dtype, hidden, weight, targets, bias, *, temperature=1.0, tol=1e-9,
                          params=None, grads=None, compute_entropy=True):
    """The suite's criterion (module docstring) for ``impl`` on ``device`` in ``dtype``; inputs are
    float64 CPU tensors. Returns the backend's results (float64, CPU)."""
    grads = random_grads(targets.shape) if grads is None else grads
    targets = targets.cpu()
    low = tuple(None if t is None else t.to(dtype).to(F64) for t in (hidden, weight, bias))  # rounded inputs
    kwargs = dict(temperature=temperature, grads=grads, compute_entropy=compute_entropy)
    truth = run("reference", "cpu", F64, low[0], low[1], targets, low[2], **kwargs)
    ref_low = truth if dtype == F64 else run("reference", "cpu", dtype, low[0], low[1], targets, low[2], **kwargs)
    got = run(impl, device, dtype, low[0], low[1], targets, low[2], params=params, **kwargs)
    names = ("logprob", "entropy")[: 1 + compute_entropy] + ("d_hidden", "d_weight", "d_bias")
    for name, t, r, x in zip(names, truth, ref_low, got):
        assert torch.isfinite(x).all() or not torch.isfinite(t).all(), f"{impl} {name}: non-finite values"
        err_ref, err = (t - r).abs(), (t - x).abs()
        bound = err_ref + tol * (1 + t.abs())
        assert torch.all(err <= bound), f"{impl} {dtype} {name}: max excess {(err - bound).max().item():.3g}"
    return got


def raw_oracle(h, W, b, y, it, g=None, e=None):
    """The raw backend contract (prepo_kernels/backends/base.py) in float64 from the reference:
    (logprob, entropy, lse) and, given upstream gradients g (and e, or None), also (grad_hidden,
    grad_weight, grad_bias or None) of sum(g * logprob + e * entropy). Inputs may be any dtype and
    device; results are float64 on CPU."""
    leaves = [None if t is None else t.detach().to("cpu", F64).requires_grad_() for t in (h, W, b)]
    it, y = it.to("cpu", F64), y.cpu()
    logprob, entropy = reference_linear_logprob_entropy(leaves[0], leaves[1], y, leaves[2], it, -100)
    z = leaves[0] @ leaves[1].T + (0 if b is None else leaves[2])
    lse = torch.logsumexp(z * it[:, None], dim=1)
    stats = tuple(t.detach() for t in (logprob, entropy, lse))
    if g is None:
        return stats
    loss = (logprob * g.to("cpu", F64)).sum()
    if e is not None:
        loss = loss + (entropy * e.to("cpu", F64)).sum()
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, live)
    return stats + tuple(grads) + ((None,) if b is None else ())
