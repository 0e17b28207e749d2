"""torch.compile(fullgraph=True) over the public API: no graph break, and compiled == eager for the
values and all three gradients, on every backend that runs here; bad input still raises.

Graphs are compiled with backend="aot_eager" (Dynamo + AOTAutograd: the fake kernels, the autograd
registration and the functionalized graph are all exercised, without paying for Inductor's C++
code generation on a 2-core CI machine); one case runs the default Inductor backend end to end.
"""
import pytest
import torch

from kernel_harness import BACKEND_DEVICES, interpreter_warnings, make_inputs
from prepo_kernels import linear_logprob_entropy, logprob_entropy_from_logits, sequence_mean, sequence_perplexity

pytestmark = interpreter_warnings


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_fn(impl, compute_entropy):
    def f(h, w, b, y, temperature, g, e):
        lp, ent = linear_logprob_entropy(h, w, y, bias=b, temperature=temperature, impl=impl,
                                         compute_entropy=compute_entropy)
        loss = (lp * g).sum()
        if compute_entropy:
            loss = loss + (ent * e).sum()
        return loss, lp, ent

    return f


def values_and_grads(f, h, w, b, *rest):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (h, w, b)]
    loss, lp, ent = f(*leaves, *rest)
    loss.backward()
    return [lp.detach(), None if ent is None else ent.detach()] + [None if t is None else t.grad for t in leaves]


# (per-token temperature, bias, compute_entropy); both cases have ignored rows and zero-gradient rows
CASES = [pytest.param(True, True, True, id="token_temp-bias-entropy"),
         pytest.param(False, False, False, id="scalar_temp-no_bias-no_entropy")]


@pytest.mark.parametrize("impl,device", BACKEND_DEVICES)
@pytest.mark.parametrize("token_temp,bias,compute_entropy", CASES)
def test_linear_logprob_entropy_compiles_fullgraph(impl, device, token_temp, bias, compute_entropy):
    n = 6
    hidden, weight, targets, b = make_inputs(n, 8, 37, bias=bias, dtype=torch.float32, device=device)
    targets[[1, 4]] = -100
    temperature = (torch.rand(n, device=device) + 0.5) if token_temp else 0.7
    g, e = torch.randn(n, device=device), torch.randn(n, device=device)
    g[:2] = 0  # rows 0 and 1 get no gradient at all (row 1 is also ignored)
    e[:2] = 0
    args = (hidden, weight, b, targets, temperature, g, e)
    f = loss_fn(impl, compute_entropy)
    explained = torch._dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = values_and_grads(f, *args)
    compiled = values_and_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), *args)
    for name, x, c in zip(("logprob", "entropy", "d_hidden", "d_weight", "d_bias"), eager, compiled):
        assert (x is None) == (c is None), name
        if x is not None:
            torch.testing.assert_close(c, x, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (compiled[2][:2] == 0).all() and (compiled[0][[1, 4]] == 0).all()


@pytest.mark.slow
def test_inductor_end_to_end():
    """The default backend (Inductor) around the op: same values and gradients as eager (about 45 s
    on 2 cores, nearly all of it Inductor generating and compiling C++)."""
    hidden, weight, targets, b = make_inputs(5, 8, 30, bias=True, dtype=torch.float32)
    targets[2] = -100
    args = (hidden, weight, b, targets, torch.rand(5) + 0.5, torch.randn(5), torch.randn(5))
    f = loss_fn("torch", True)
    eager = values_and_grads(f, *args)
    compiled = values_and_grads(torch.compile(f, fullgraph=True), *args)
    for x, c in zip(eager, compiled):
        torch.testing.assert_close(c, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_compiled_call_still_checks_values(impl):
    """Target ids and temperatures are checked by ops inside the graph: same errors as eager."""
    hidden, weight, targets, _ = make_inputs(4, 8, 10, dtype=torch.float32)

    def f(h, w, y, temperature):
        return linear_logprob_entropy(h, w, y, temperature=temperature, impl=impl)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ok = torch.ones(4)
    torch.testing.assert_close(compiled(hidden, weight, targets, ok), f(hidden, weight, targets, ok))
    with pytest.raises(ValueError, match=r"targets contains 10, outside \[0, 10\)"):
        compiled(hidden, weight, torch.tensor([0, 1, 10, -100]), ok)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        compiled(hidden, weight, targets, torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_argument_errors_under_fullgraph_quote_the_eager_message():
    """Shape/type errors are found while tracing; with fullgraph=True Dynamo re-raises them as its
    own exception whose message quotes ours (documented in linear_logprob_entropy)."""
    hidden, weight, targets, _ = make_inputs(4, 8, 10, dtype=torch.float32)

    def f(h, w, y):
        return linear_logprob_entropy(h, w, y, impl="torch")[0]

    with pytest.raises(Exception, match="hidden's last dim \\(7\\) must equal weight's hidden size D=8"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(hidden[:, :7], weight, targets)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_from_logits_compiles_fullgraph(impl):
    logits = torch.randn(2, 5, 30, dtype=torch.float64)
    targets = torch.randint(0, 30, (2, 5))
    targets[0, :2] = -100
    temperature = torch.rand(2, 5, dtype=torch.float64) + 0.5

    def f(z, y, t):
        lp, ent = logprob_entropy_from_logits(z, y, temperature=t, impl=impl)
        return (lp * 0.3).sum() + ent.sum()

    assert torch._dynamo.explain(f)(logits, targets, temperature).graph_break_count == 0
    z_eager, z_comp = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out_eager = f(z_eager, targets, temperature)
    out_comp = torch.compile(f, fullgraph=True, backend="aot_eager")(z_comp, targets, temperature)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.backward()
    out_comp.backward()
    torch.testing.assert_close(z_comp.grad, z_eager.grad)


def test_sequence_reductions_compile_fullgraph():
    values = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    cu = torch.tensor([0, 4, 4, 15])

    def f(v, m, cu):
        return sequence_perplexity(v, m) + sequence_mean(v.reshape(-1), cu_seqlens=cu).sum()

    assert torch._dynamo.explain(f)(values, mask, cu).graph_break_count == 0
    v_eager, v_comp = values.clone().requires_grad_(), values.clone().requires_grad_()
    out_eager = f(v_eager, mask, cu)
    out_comp = torch.compile(f, fullgraph=True, backend="aot_eager")(v_comp, mask, cu)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.sum().backward()
    out_comp.sum().backward()
    torch.testing.assert_close(v_comp.grad, v_eager.grad)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="mask must be boolean"):
        compiled(values, mask * 2, cu)
    with pytest.raises(ValueError, match="never decrease"):
        compiled(values, mask, torch.tensor([0, 9, 4, 15]))
