import pytest
import torch

from prepo_kernels import available_impls, linear_logprob_entropy, logprob_entropy_from_logits
from prepo_kernels.backends import torch_chunked


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_matches_linear_reference(dtype, monkeypatch):
    monkeypatch.setattr(torch_chunked, "TILE_ELEMENTS", 700)  # several row chunks
    hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    weight = torch.randn(300, 16, dtype=torch.float64)
    targets = torch.randint(0, 300, (2, 9))
    targets[0, :3] = -100
    temperature = torch.rand(2, 9, dtype=torch.float64) + 0.5
    logits = (hidden @ weight.T).to(dtype).requires_grad_()
    lp, ent = logprob_entropy_from_logits(logits, targets, temperature=temperature)
    ref_logits = logits.detach().clone().requires_grad_()
    lp_ref, ent_ref = logprob_entropy_from_logits(ref_logits, targets, temperature=temperature, impl="reference")
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)
    g, e = torch.randn_like(lp), torch.randn_like(lp)
    ((lp * g).sum() + (ent * e).sum()).backward()
    ((lp_ref * g).sum() + (ent_ref * e).sum()).backward()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(logits.grad, ref_logits.grad, **tol)
    assert (logits.grad[0, :3] == 0).all()
    if dtype == torch.float64:
        lp_lin, ent_lin = linear_logprob_entropy(hidden, weight, targets, temperature=temperature, impl="reference")
        torch.testing.assert_close(lp, lp_lin)
        torch.testing.assert_close(ent, ent_lin)


def test_impl_resolves_through_the_registry(monkeypatch):
    """Every name linear_logprob_entropy accepts is accepted here too; fused backends share the
    row-chunked path, so they agree exactly."""
    logits = torch.randn(4, 30, dtype=torch.float64)
    targets = torch.tensor([3, -100, 29, 0])
    lp, ent = logprob_entropy_from_logits(logits, targets, impl="torch")
    lp_ref, ent_ref = logprob_entropy_from_logits(logits, targets, impl="reference")
    for impl in available_impls("cpu") + ["auto"]:
        got = logprob_entropy_from_logits(logits, targets, impl=impl)
        exact = dict(rtol=0, atol=0) if impl != "reference" else {}
        torch.testing.assert_close(got[0], lp, **exact)
        torch.testing.assert_close(got[1], ent, **exact)
    monkeypatch.setenv("PREPO_KERNELS_IMPL", "reference")
    got = logprob_entropy_from_logits(logits, targets)
    torch.testing.assert_close(got[0], lp_ref, rtol=0, atol=0)
    torch.testing.assert_close(got[1], ent_ref, rtol=0, atol=0)


def test_gradcheck():
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 6])
    assert torch.autograd.gradcheck(lambda z: logprob_entropy_from_logits(z, targets, temperature=0.8), (logits,))
