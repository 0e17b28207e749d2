"""bf16 on the native CPU ops: the brgemm path (bf16 x bf16 -> fp32 tile GEMMs, dz rounded to bf16
for the backward GEMMs) against a float64 oracle, with naive bf16 PyTorch as the yardstick (the Cut
Cross-Entropy criterion: logits = hidden @ weight.T in bf16, log_softmax in fp32, autograd), and the
upcast fallback (PREPO_CPU_BF16_BRGEMM=0, odd D) against the oracle at fp32 tolerance.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("prepo_kernels._C", reason="native extension prepo_kernels._C not built")

from kernel_harness import cpu_has_bf16_dot  # noqa: E402

ops = torch.ops.prepo_kernels


def make(n, D, V, bias=False, neg_inf_bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen).bfloat16()
    w = (torch.randn(V, D, generator=gen) * (3.0 / D**0.5)).bfloat16()
    b = torch.randn(V, generator=gen).bfloat16() if bias else None
    if neg_inf_bias:
        b[1::3] = float("-inf")
    y = torch.randint(0, V, (n,), generator=gen)
    if b is not None:
        finite = torch.nonzero(torch.isfinite(b)).flatten()
        y = finite[torch.randint(0, finite.numel(), (n,), generator=gen)]
    it = 0.4 + 1.6 * torch.rand(n, generator=gen)
    g, e = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return h, w, b, y, it, g, e


def losses_and_grads(h, w, b, y, it, g, e, dtype):
    """(logprob, entropy, grads of sum(g logprob + e entropy) w.r.t. h, w[, b]); the logits are
    computed in `dtype` (float64: the oracle; bfloat16: naive PyTorch) and normalized in fp32 or fp64."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    z = leaves[0] @ leaves[1].T
    if b is not None:
        z = z + leaves[2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = z.to(acc) * it.to(acc)[:, None]
    logp = z.log_softmax(-1)
    p = logp.exp()
    lp = logp.gather(1, y[:, None])[:, 0]
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    grads = torch.autograd.grad((lp * g.to(acc)).sum() + (ent * e.to(acc)).sum(), leaves)
    return lp.detach(), ent.detach(), grads


def fused(h, w, b, y, it, g, e):
    lp, ent, lse = ops.lle_forward(h, w, b, y, it, True)
    dh, dw, db = ops.lle_backward(g, e, h, w, b, y, it, lse, ent)
    return lp, ent, (dh, dw) + ((db,) if b is not None else ())


def rel_err(x, ref):
    """Relative Frobenius error against the float64 oracle."""
    return ((x.double() - ref).norm() / ref.norm()).item()


CASES = [
    # n, D, V, bias, neg_inf_bias
    (64, 128, 3001, False, False),  # V not a multiple of the tile or of the 64-column panel
    (33, 96, 1000, True, False),  # odd n (padded K of the dW GEMM), bias
    (17, 64, 257, True, True),  # -inf bias entries, odd vocab tile
]


@pytest.fixture(params=["default", "tiny"])
def tiles(request, monkeypatch):
    if request.param == "tiny":  # many vocab tiles, several row blocks, odd tile sizes
        monkeypatch.setenv("PREPO_CPU_VOCAB_TILE", "67")
        monkeypatch.setenv("PREPO_CPU_ROW_TILE", "5")
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_D{}_V{}_b{}_inf{}".format(*c))
def test_bf16_no_worse_than_naive(case, tiles):
    n, D, V, bias, neg_inf = case
    inputs = make(n, D, V, bias, neg_inf)
    lp_o, ent_o, grads_o = losses_and_grads(*inputs, torch.float64)
    lp_n, ent_n, grads_n = losses_and_grads(*inputs, torch.bfloat16)
    lp, ent, grads = fused(*inputs)
    # statistics: fp32 logits from the bf16 inputs, as accurate as the fp32 path
    torch.testing.assert_close(lp.double(), lp_o, rtol=2e-5, atol=2e-5 * max(1.0, lp_o.abs().max().item()))
    torch.testing.assert_close(ent.double(), ent_o, rtol=2e-5, atol=2e-5 * max(1.0, ent_o.abs().max().item()))
    assert rel_err(lp, lp_o) <= rel_err(lp_n, lp_o) and rel_err(ent, ent_o) <= rel_err(ent_n, ent_o)
    for name, x, x_naive, ref in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads_n, grads_o):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, ref) <= rel_err(x_naive, ref), (name, rel_err(x, ref), rel_err(x_naive, ref))


def test_bf16_fallback_is_exact_upcast(monkeypatch):
    """PREPO_CPU_BF16_BRGEMM=0 (and an odd D) run the fp32 upcast path: gradients at fp32 tolerance;
    on a CPU with bf16 dot products the default path is the brgemm one (dz rounded to bf16)."""
    inputs = make(40, 64, 2049, bias=True)
    _, _, grads_o = losses_and_grads(*inputs, torch.float64)
    _, _, grads_fast = fused(*inputs)
    monkeypatch.setenv("PREPO_CPU_BF16_BRGEMM", "0")
    _, _, grads_up = fused(*inputs)
    check_upcast_grads(grads_up, grads_o)
    if cpu_has_bf16_dot():
        assert rel_err(grads_fast[0], grads_o[0]) > 1e-5  # dz was rounded: the brgemm path ran
    monkeypatch.delenv("PREPO_CPU_BF16_BRGEMM")
    odd = make(9, 33, 300)  # odd D: the VNNI operands need an even D, so this is upcast too
    _, _, grads_o = losses_and_grads(*odd, torch.float64)
    _, _, grads_odd = fused(*odd)
    check_upcast_grads(grads_odd, grads_o)


def check_upcast_grads(grads, oracle):
    """fp32 accuracy, but for grad_weight, which comes back in the weight's dtype (rounded once:
    relative error at most 2^-9 an entry)."""
    for i, (x, ref) in enumerate(zip(grads, oracle)):
        assert rel_err(x, ref) < (2.0**-8 if i == 1 else 1e-5)
    assert grads[1].dtype == torch.bfloat16
