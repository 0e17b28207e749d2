"""Triton-specific tests: the launchers called directly (vocab splits, many small tiles), the
deterministic mode and the bf16/fp16 gradient filter, availability, and an ahead-of-time compile
for sm_90. The public-API accuracy tests for triton are in test_kernels.py (same harness).

On CPU these run through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 when no CUDA
device is present); on a CUDA device natively (marker ``gpu``).
"""
import os

import pytest
import torch

from kernel_harness import F64, assert_close_to_truth, device_params, interpreter_warnings, make_inputs, run
from prepo_kernels import KernelParams
from prepo_kernels.backends.base import BackwardInputs, ForwardInputs
from prepo_kernels.backends import registry

triton = pytest.importorskip("triton")
from prepo_kernels.backends.triton_backend import BACKENDS  # noqa: E402

pytestmark = interpreter_warnings
DEVICES = device_params("triton")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_split_merge_matches_single_pass(device):
    """Splitting the vocabulary over programs and merging partial stats gives the same values."""
    from prepo_kernels.triton import triton_forward

    hidden, weight, targets, bias = make_inputs(5, 16, 300, bias=True)
    bias[:40] = float("-inf")  # a split whose slice is entirely -inf for every row
    targets = targets.clamp(min=40)
    args = [t.to(device) for t in (hidden, weight, bias, targets)]
    inv_temp = (torch.rand(5, dtype=F64) + 0.5).to(device)
    rows = ForwardInputs(*args, inv_temp, KernelParams())
    base = triton_forward(rows, num_splits=1)
    truth = run("reference", "cpu", F64, hidden, weight, targets, bias, temperature=1 / inv_temp.cpu(),
                grads=(torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)))
    torch.testing.assert_close(base[0].cpu(), truth[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base[1].cpu(), truth[1], rtol=1e-12, atol=1e-12)
    from prepo_kernels.triton.config import Blocks

    for splits in (2, 3, 10):
        got = triton_forward(rows, num_splits=splits, blocks=Blocks(16, 32, 16))
        for a, b in zip(base, got):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    lp, ent, lse = triton_forward(ForwardInputs(*args, inv_temp, KernelParams(compute_entropy=False)),
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
        lp, ent, lse = triton_forward(ForwardInputs(h, w, b, y, it, KernelParams()), num_splits=splits,
                                      blocks=blocks)
        torch.testing.assert_close(lp.cpu(), truth[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent.cpu(), truth[1], rtol=1e-12, atol=1e-12)
    g, e = (t.to(dev) for t in grads)
    params = KernelParams(deterministic=deterministic)
    dh, dw, db = triton_backward(BackwardInputs(h, w, b, y, it, params, g, e, lse, ent), blocks=blocks)
    for got, want in zip((dh, dw, db), truth[2:]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    # no entropy gradient (compute_entropy=False path): only the logprob part
    no_e = BackwardInputs(h, w, b, y, it, params, g, None, lse, torch.empty(0, dtype=F64, device=dev))
    dh, dw, db = triton_backward(no_e, blocks=blocks)
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
        on, off = (triton_backward(BackwardInputs(h, w, b, y, inv_t, KernelParams(deterministic=deterministic,
                                                                                 grad_filter=grad_filter),
                                                 g, e, lse, ent), blocks=blocks) for grad_filter in (True, False))
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
    assert_close_to_truth("triton", device, torch.bfloat16, hidden, weight, targets, bias, tol=1e-2, grads=grads,
                          params=KernelParams(grad_filter=True, deterministic=deterministic))


def linear_stats(h, w, b, y, inv_t):
    from prepo_kernels.triton import triton_forward

    return triton_forward(ForwardInputs(h, w, b, y, inv_t, KernelParams()))


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
    """Compile the bf16 kernel variants (the fused GRPO loss's row kernel on their fp32 logits
    included), and that row kernel on fp64 logits, for sm_90 with the GPU launch configs
    (triton.compile with a GPUTarget, ptxas from the triton wheel) in a subprocess without
    TRITON_INTERPRET."""
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
    for args in (["--dtypes", "bf16"], ["--dtypes", "fp64", "--kernels", "grpo_rows"]):
        proc = subprocess.run([sys.executable, "-m", "prepo_kernels.triton.aot_check", "--arch", "90", *args],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "all variants compiled" in proc.stdout
        assert proc.stdout.count("ok   grpo_stats ") == 2 and proc.stdout.count("ok   grpo_grad ") == 2
