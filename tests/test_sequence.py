import torch

from prepo_kernels import sequence_mean, sequence_perplexity


def test_padded_and_packed_agree():
    lengths = [3, 0, 5, 1]
    seqs = [torch.randn(n, dtype=torch.float64) for n in lengths]
    padded = torch.zeros(4, 6, dtype=torch.float64)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = True
    padded[~mask] = 123.0  # garbage in padding must not leak
    packed = torch.cat(seqs)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    a = sequence_mean(padded, mask)
    b = sequence_mean(packed, cu_seqlens=cu)
    torch.testing.assert_close(a, b)
    expected = torch.stack([s.mean() if len(s) else torch.tensor(0.0, dtype=torch.float64) for s in seqs])
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(sequence_perplexity(padded, mask), sequence_perplexity(packed, cu_seqlens=cu))


def test_empty_sequence_is_documented_not_nan():
    values = torch.randn(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert sequence_mean(values, mask)[1] == 0
    assert sequence_perplexity(values, mask)[1] == 1.0
    assert torch.isfinite(sequence_perplexity(values, mask)).all()


def test_perplexity_value_and_gradient():
    """ppl = exp(-mean of the masked log-probs): d ppl / d logprob_t = -ppl / n on the n masked-in
    tokens, 0 on the others (padding gets no gradient)."""
    logprob = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.2, 0.7, 0.4]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ppl = sequence_perplexity(logprob, mask)
    want = torch.tensor([(0.5 * 0.25) ** -0.5, (0.2 * 0.7 * 0.4) ** (-1 / 3)], dtype=torch.float64)
    torch.testing.assert_close(ppl, want)
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64)   # distinct upstream gradients per row
    (ppl * weights).sum().backward()
    n = mask.sum(1, keepdim=True)
    torch.testing.assert_close(logprob.grad, (-weights * want)[:, None] / n * mask)
    torch.autograd.gradcheck(lambda lp: sequence_perplexity(lp, mask), (logprob.detach().requires_grad_(),))


def test_packed_mask():
    values = torch.arange(6.0)
    mask = torch.tensor([1, 0, 1, 1, 1, 0])
    out = sequence_mean(values, mask, cu_seqlens=torch.tensor([0, 3, 6]))
    torch.testing.assert_close(out, torch.tensor([1.0, 3.5]))
