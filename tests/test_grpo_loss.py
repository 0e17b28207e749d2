"""linear_grpo_loss, every backend, against the float64 truth: the reference log-probs through
``prepo.loss.grpo_loss`` (the trainer's own loss), values and the hidden / weight / bias gradients,
held to the suite's criterion (kernel_harness): |truth - impl| <= |truth - same-dtype reference| +
tol (1 + |truth|). Inputs put tokens on both sides of the clip range on purpose."""
import dataclasses
import re

import pytest
import torch

from kernel_harness import F64, cpu_has_bf16_dot, interpreter_warnings, make_inputs, skip_reason
from prepo.loss import grpo_loss
from prepo_kernels import BackendUnavailableError, GRPOLossParams, GRPOLossStats, linear_grpo_loss, linear_logprob_entropy
from prepo_kernels.backends import grpo_chunks

# "triton" runs on CPU under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1): slow, so
# the shapes here stay small
IMPLS = [pytest.param(i, marks=[pytest.mark.skip(reason=skip_reason(i, "cpu"))] if skip_reason(i, "cpu") else [])
         for i in ("reference", "torch", "cpu", "triton")]
FUSED = IMPLS[1:]
pytestmark = interpreter_warnings  # numpy's warnings of the interpreter's guarded -inf arithmetic
LOW = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# ratio bands: below 1 - eps_low, inside, above 1 + eps_high; away from the edges, so that a
# low-precision log-prob cannot move a token across one
BANDS = ((0.5, 0.7), (0.85, 1.2), (1.4, 1.7))


def make_case(n, d, vocab, *, lead=None, bias=True, ignore_frac=0.2, zero_adv_frac=0.2, temperature=0.7, seed=0):
    """float64 inputs; old_logprob set from the true log-probs so the ratios fall in BANDS, and
    advantages of both signs, some exactly 0."""
    hidden, weight, targets, b = make_inputs(n, d, vocab, bias=bias, ignore_frac=ignore_frac, lead=lead, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lp, _ = linear_logprob_entropy(hidden, weight, targets, bias=b, temperature=temperature, impl="reference")
    band = torch.randint(0, len(BANDS), targets.shape, generator=gen)
    lo, hi = (torch.tensor([x[i] for x in BANDS], dtype=F64)[band] for i in (0, 1))
    ratio = lo + (hi - lo) * torch.rand(targets.shape, dtype=F64, generator=gen)
    old = lp - ratio.log()
    adv = torch.randn(targets.shape, dtype=F64, generator=gen)
    adv[torch.rand(targets.shape, generator=gen) < zero_adv_frac] = 0
    return dict(hidden=hidden, weight=weight, targets=targets, bias=b, old=old, adv=adv, temperature=temperature)


def truth(case, num_tokens=None, eps=(0.2, 0.28)):
    """(loss, [d_hidden, d_weight, d_bias], logprob, entropy, clip_frac) in float64 through grpo_loss,
    each token its own row so that per-token advantages fit grpo_loss's per-row argument."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in
              (case["hidden"], case["weight"], case["bias"])]
    lp, ent = linear_logprob_entropy(leaves[0], leaves[1], case["targets"], bias=leaves[2],
                                     temperature=case["temperature"], impl="reference")
    mask = (case["targets"] != -100).reshape(-1, 1)
    adv = torch.broadcast_to(case["adv"], lp.shape).reshape(-1)
    out = grpo_loss(lp.reshape(-1, 1), case["old"].reshape(-1, 1), adv, mask, eps_low=eps[0], eps_high=eps[1],
                    num_tokens=num_tokens)
    out.loss.backward()
    grads = [t.grad for t in leaves if t is not None]
    return out.loss.detach(), grads, lp.detach(), ent.detach(), out.clip_frac


def run(impl, dtype, case, num_tokens=None, eps=(0.2, 0.28), compute_entropy=True, device="cpu"):
    """(loss, [d_hidden, d_weight, d_bias], stats) of linear_grpo_loss in ``dtype`` on ``device``,
    float64 on CPU on the way out."""
    on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in
              (on["hidden"], on["weight"], on["bias"])]
    loss, stats = linear_grpo_loss(leaves[0], leaves[1], on["targets"], on["old"], on["adv"], bias=leaves[2],
                                   temperature=on["temperature"], params=GRPOLossParams(eps_low=eps[0], eps_high=eps[1]),
                                   num_tokens=num_tokens, compute_entropy=compute_entropy, impl=impl)
    loss.backward()
    stats = dataclasses.replace(stats, **{f.name: getattr(stats, f.name).cpu() for f in dataclasses.fields(stats)
                                          if isinstance(getattr(stats, f.name), torch.Tensor)})
    return loss.detach().cpu().to(F64), [t.grad.cpu().to(F64) for t in leaves if t is not None], stats


def rounded(case, dtype):
    """The case with hidden / weight / bias rounded to ``dtype`` (the truth of a low-precision call)."""
    out = dict(case)
    for k in ("hidden", "weight", "bias"):
        out[k] = None if case[k] is None else case[k].to(dtype).to(F64)
    return out


def assert_close_to_truth(impl, dtype, case, tol, device="cpu", **kwargs):
    case = rounded(case, dtype)
    t_loss, t_grads, t_lp, t_ent, t_clip = truth(case, **kwargs)
    r_loss, r_grads, _ = run("reference", dtype, case, **kwargs)
    loss, grads, stats = run(impl, dtype, case, device=device, **kwargs)
    names = ["loss", "d_hidden", "d_weight", "d_bias"]
    for name, t, r, x in zip(names, [t_loss] + t_grads, [r_loss] + r_grads, [loss] + grads):
        bound = (t - r).abs() + tol * (1 + t.abs())
        assert torch.all((t - x).abs() <= bound), f"{impl} {dtype} {name}: max excess {((t - x).abs() - bound).max():.3g}"
    computed, valid = stats.computed, case["targets"] != -100
    # the one-pass path computes the rows with a gradient; the reference (two passes) every valid one
    nonzero = torch.broadcast_to(case["adv"], computed.shape) != 0
    assert torch.equal(computed, valid if impl == "reference" else valid & nonzero)
    lp_tol = 1e-9 if dtype == F64 else 3e-2
    assert torch.allclose(stats.logprob.to(F64)[computed], t_lp[computed], atol=lp_tol, rtol=lp_tol)
    assert torch.allclose(stats.entropy.to(F64)[computed], t_ent[computed], atol=lp_tol, rtol=lp_tol)
    assert (stats.logprob[~computed] == 0).all() and (stats.entropy[~computed] == 0).all()
    assert not stats.logprob.requires_grad
    return t_clip, stats


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,vocab", [(1, 8, 50), (7, 13, 300), (40, 48, 129), (33, 16, 2500)])
def test_float64_matches_grpo_loss(impl, n, d, vocab):
    case = make_case(n, d, vocab, zero_adv_frac=0.2 if n > 1 else 0.0, ignore_frac=0.2 if n > 1 else 0.0)
    t_clip, stats = assert_close_to_truth(impl, F64, case, 1e-9)
    assert stats.clip_frac.item() == pytest.approx(t_clip, abs=1e-12)


def test_inputs_clip_on_both_sides():
    """The cases above do exercise both clipped branches, ignored targets and zero advantages."""
    case = make_case(40, 48, 129)
    lp, _ = linear_logprob_entropy(case["hidden"], case["weight"], case["targets"], bias=case["bias"],
                                   temperature=case["temperature"], impl="reference")
    ratio, adv, valid = (lp - case["old"]).exp(), case["adv"], case["targets"] != -100
    assert ((ratio > 1.28) & (adv > 0) & valid).sum() >= 2
    assert ((ratio < 0.8) & (adv < 0) & valid).sum() >= 2
    assert (~valid).sum() >= 3 and ((adv == 0) & valid).sum() >= 3


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_large_and_masked_logits(impl, dtype):
    """Logits in the hundreds and vocabulary entries masked by a -inf bias (never a target): finite
    values and gradients, p = 0 exactly on the masked entries (no inf * 0)."""
    check_large_and_masked(impl, dtype, masked_head=0)


def check_large_and_masked(impl, dtype, masked_head, device="cpu"):
    """About half of 300 vocabulary entries masked, and the first ``masked_head`` of them all."""
    case = make_case(37, 16, 300, temperature=1.3)
    case["hidden"] = case["hidden"] * 60
    y = case["targets"]
    case["targets"] = torch.where((y >= 0) & (y < masked_head), y + masked_head, y)
    masked = torch.ones(300, dtype=torch.bool)
    masked[case["targets"][case["targets"] >= 0]] = False
    masked &= (torch.arange(300) % 2 == 0) | (torch.arange(300) < masked_head)
    case["bias"] = case["bias"].masked_fill(masked, float("-inf"))
    t_loss, t_grads, *_ = truth(case)
    loss, grads, stats = run(impl, dtype, case, device=device)
    assert torch.isfinite(stats.logprob).all() and torch.isfinite(stats.entropy).all()
    tol = 1e-9 if dtype == F64 else 1e-4
    for t, x in zip([t_loss] + t_grads[:2], [loss] + grads[:2]):
        assert torch.allclose(x, t, atol=tol * (1 + t.abs().max()), rtol=tol)
    assert (grads[2][case["bias"] == float("-inf")] == 0).all()


@pytest.mark.skipif(skip_reason("triton", "cpu") is not None, reason=str(skip_reason("triton", "cpu")))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_triton_rows_over_many_vocab_tiles(dtype, monkeypatch):
    """The Triton row kernel with 16-wide vocab tiles (19 per row, the last one partial, the first
    two entirely -inf): its running max / sum / entropy sum across tiles, and its second pass."""
    from prepo_kernels.triton import config

    monkeypatch.setattr(config, "grpo_rows_blocks", lambda vocab, dt: (16, 4))
    check_large_and_masked("triton", dtype, masked_head=32)
    if dtype == F64:  # both clipped branches, ignored and zero-advantage rows
        assert_close_to_truth("triton", F64, make_case(20, 13, 300), 1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(skip_reason("triton", "cuda") is not None, reason=str(skip_reason("triton", "cuda")))
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_triton_on_cuda(dtype):
    """The triton backend compiled and run on a CUDA device (the tests above run it on CPU, under
    Triton's interpreter): against the truth, and with large and -inf-masked logits in fp32 / fp64."""
    tol = 1e-9 if dtype == F64 else LOW[dtype]
    assert_close_to_truth("triton", dtype, make_case(48, 64, 2500), tol, device="cuda")
    if dtype != torch.bfloat16:
        check_large_and_masked("triton", dtype, masked_head=0, device="cuda")


@pytest.mark.parametrize("impl", FUSED)
def test_several_chunks(impl, monkeypatch):
    """Rows in several chunks (the last one short): dW accumulates across them."""
    monkeypatch.setattr(grpo_chunks, "CHUNK_BYTES", 3 * 4 * 300)  # 3 rows
    assert_close_to_truth(impl, F64, make_case(20, 13, 300), 1e-9)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_reference_error(impl, dtype, monkeypatch):
    monkeypatch.setattr(grpo_chunks, "TILE_BYTES", 4 * 64 * 1000)  # the C++ backend's W / dW tiles: 1000 rows
    assert grpo_chunks.tile_rows(64) == 1000
    case = make_case(48, 64, 2500)  # V above the tile, not a multiple
    assert_close_to_truth(impl, dtype, case, LOW[dtype])


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dw_accumulates_across_chunks(impl, dtype, monkeypatch):
    """bf16 / fp16: dW accumulates in the weight's dtype across row chunks (no [V, D] fp32
    buffer), here 3 chunks of 16 rows and 3 vocab tiles, and stays within the reference's error."""
    monkeypatch.setattr(grpo_chunks, "CHUNK_BYTES", 1)  # the 16-row minimum
    monkeypatch.setattr(grpo_chunks, "TILE_BYTES", 4 * 64 * 1000)
    assert grpo_chunks.chunk_rows(2500) == 16 and grpo_chunks.tile_rows(64) == 1000
    assert_close_to_truth(impl, dtype, make_case(48, 64, 2500), LOW[dtype])


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason=str(skip_reason("cpu", "cpu")))
def test_cpu_bf16_gemm_dtype_follows_the_cpu(monkeypatch):
    """bf16 on the C++ backend: bf16 GEMMs (oneDNN's brgemm, dz rounded to bf16) where the CPU has
    native bf16 dot products, fp32 GEMMs on upcast tiles where it has not or PREPO_CPU_BF16_BRGEMM=0;
    both within the reference's error, and on a CPU with native bf16 the two differ (the bf16 GEMMs
    ran). Odd D always takes the upcast path."""
    case = make_case(48, 64, 2500)
    runs = {}
    for env in ("0", "1"):
        monkeypatch.setenv("PREPO_CPU_BF16_BRGEMM", env)
        assert_close_to_truth("cpu", torch.bfloat16, case, LOW[torch.bfloat16])
        runs[env] = run("cpu", torch.bfloat16, case)[1][0]
    assert (not torch.equal(runs["0"], runs["1"])) == cpu_has_bf16_dot()
    assert_close_to_truth("cpu", torch.bfloat16, make_case(24, 63, 300), LOW[torch.bfloat16])


@pytest.mark.parametrize("impl", IMPLS)
def test_on_policy_without_old_logprob(impl):
    """old_logprob=None (TRL's on-policy case): the old log-probs are the new ones, detached, so
    every ratio is 1 and nothing is clipped; the truth is grpo_loss with old = the float64 log-probs."""
    case = make_case(40, 48, 129)
    true_lp, _ = linear_logprob_entropy(case["hidden"], case["weight"], case["targets"], bias=case["bias"],
                                        temperature=case["temperature"], impl="reference")
    t_loss, t_grads, _, _, t_clip = truth(dict(case, old=true_lp))
    loss, grads, stats = run(impl, F64, dict(case, old=None))
    for t, x in zip([t_loss] + t_grads, [loss] + grads):
        torch.testing.assert_close(x, t, rtol=1e-9, atol=1e-12)
    assert t_clip == 0 and stats.clip_frac.item() == 0
    assert stats.computed.sum() > 0 and t_grads[1].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_advantages_lead_dims_num_tokens(impl):
    """[B, T] targets, per-token advantages (PREPO's w_i folded in), a tensor temperature and a
    micro-batch's num_tokens."""
    case = make_case(None, 24, 200, lead=(3, 11))
    case["temperature"] = torch.rand(3, 1, dtype=F64) + 0.5
    assert_close_to_truth(impl, F64, case, 1e-9, num_tokens=57)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_rollout_advantages_broadcast(impl):
    case = make_case(None, 16, 90, lead=(4, 6))
    case["adv"] = case["adv"][:, :1].clone()  # [B, 1]
    case["adv"][1] = 0  # a whole zero-advantage rollout
    assert_close_to_truth(impl, F64, case, 1e-9, eps=(0.1, 0.35))


def spy_one_pass(monkeypatch):
    """Records (rows, need_grad, grad_weight's data pointer) of each one-pass call."""
    import prepo_kernels.grpo_loss as module

    calls = []

    def spy(chunks, hidden, weight, bias, targets, inv_temp, token_grads, need_grad, compute_entropy):
        out = grpo_chunks.one_pass_fwdbwd(chunks, hidden, weight, bias, targets, inv_temp, token_grads, need_grad,
                                          compute_entropy)
        calls.append((hidden.shape[0], need_grad, out[2][1].data_ptr() if need_grad else None))
        return out

    monkeypatch.setattr(module, "one_pass_fwdbwd", spy)
    return calls


@pytest.mark.parametrize("impl", FUSED)
def test_skipped_rows_never_reach_the_backend(impl, monkeypatch):
    """Ignored and zero-advantage rows cost nothing: the backend sees only the others, and their
    hidden gradient is exactly 0."""
    calls = spy_one_pass(monkeypatch)
    case = make_case(30, 8, 60)
    _, grads, stats = run(impl, F64, case)
    assert [c[0] for c in calls] == [int(stats.computed.sum())] and calls[0][0] < 30
    assert (grads[0][~stats.computed] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_to_compute(impl):
    case = make_case(6, 8, 40)
    case["adv"] = torch.zeros_like(case["adv"])
    loss, grads, stats = run(impl, F64, case)
    assert loss.item() == 0 and all((g == 0).all() for g in grads)
    assert not stats.computed.any() or impl == "reference"  # the reference computes every valid row


@pytest.mark.parametrize("impl", FUSED)
def test_no_grad_skips_the_gradient_matmuls(impl, monkeypatch):
    calls = spy_one_pass(monkeypatch)
    case = make_case(12, 8, 40)
    with torch.no_grad():
        loss, _ = linear_grpo_loss(case["hidden"], case["weight"], case["targets"], case["old"], case["adv"],
                                   bias=case["bias"], temperature=0.7, impl=impl)
    assert [c[1] for c in calls] == [False]
    assert loss.item() == pytest.approx(truth(case)[0].item(), abs=1e-12)


@pytest.mark.parametrize("impl", FUSED)
def test_upstream_gradient_and_micro_batches(impl):
    """Two micro-batches with the whole batch's num_tokens sum to the whole batch's loss and
    gradients; a scaled loss scales the gradients."""
    case = make_case(20, 8, 40)
    n_tok = int((case["targets"] != -100).sum())
    w = case["weight"].clone().requires_grad_()
    total = 0
    for rows in (slice(0, 9), slice(9, 20)):
        loss, _ = linear_grpo_loss(case["hidden"][rows], w, case["targets"][rows], case["old"][rows],
                                   case["adv"][rows], bias=case["bias"], temperature=0.7, num_tokens=n_tok, impl=impl)
        total = total + loss
    (3 * total).backward()
    t_loss, t_grads, *_ = truth(case)
    assert total.item() == pytest.approx(t_loss.item(), abs=1e-12)
    assert torch.allclose(w.grad, 3 * t_grads[1], atol=1e-12)


BAD = [
    ("old_logprob shape", dict(old=torch.zeros(3)), ValueError, "old_logprob shape"),
    ("old_logprob ints", dict(old=torch.zeros(4, dtype=torch.long)), TypeError, "old_logprob must be float"),
    ("advantages shape", dict(adv=torch.zeros(3)), ValueError, "advantages of shape"),
    ("advantages list", dict(adv=[0.0] * 4), TypeError, "advantages must be a torch.Tensor"),
    ("params type", dict(params=dict(eps_low=0.1)), TypeError, "params must be a GRPOLossParams"),
    ("accumulation_steps", dict(accumulation_steps=0), ValueError, "accumulation_steps must be"),
    ("rollout_weights shape", dict(rollout_weights=torch.ones(4)), ValueError, "rollout_weights shape"),
    ("num_tokens zero", dict(num_tokens=0), ValueError, "num_tokens must be"),
    ("num_tokens type", dict(num_tokens=torch.tensor(3)), TypeError, "num_tokens must be a number"),
    ("weight dtype", dict(weight=torch.randn(10, 8, dtype=F64)), TypeError, "weight dtype"),
    ("targets range", dict(targets=torch.tensor([0, 1, 2, 10])), ValueError, "outside \\[0, 10\\)"),
    ("temperature", dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    ("compute_entropy", dict(compute_entropy=1), TypeError, "compute_entropy must be a bool"),
    ("impl", dict(impl="fastest"), ValueError, "impl must be"),
    ("cuda on cpu", dict(impl="cuda"), BackendUnavailableError, "impl='cuda' is unavailable on cpu"),
]


@pytest.mark.parametrize("name,overrides,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, overrides, exc, match):
    kwargs = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.randint(0, 10, (4,)),
                  old=torch.zeros(4), adv=torch.ones(4))
    kwargs.update(overrides)
    args = [kwargs.pop(k) for k in ("hidden", "weight", "targets", "old", "adv")]
    with pytest.raises(exc, match=match):
        linear_grpo_loss(*args, **kwargs)


@pytest.mark.parametrize("bad, match", [(dict(eps_low=1.0), "clip range"), (dict(eps_high=-0.1), "clip range"),
                                        (dict(eps_high="0.2"), "eps_high must be a finite number")])
def test_bad_clip_range(bad, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossParams(**bad)


def test_chunk_rows_bounds_the_logits():
    assert grpo_chunks.chunk_rows(32768) * 32768 * 4 <= grpo_chunks.CHUNK_BYTES
    assert grpo_chunks.tile_rows(1024) * 1024 * 4 <= grpo_chunks.TILE_BYTES
    assert grpo_chunks.chunk_rows(10) == 1024 and grpo_chunks.chunk_rows(10**7) == 16


def test_one_backend_system(monkeypatch):
    """The loss resolves ``impl`` with the log-prob op's registry: "auto" is the same backend for
    both (PREPO_KERNELS_IMPL included), an impl that cannot run raises the same error for both, and
    "cuda" (no one-pass chunks) runs every variant in two passes through linear_logprob_entropy."""
    from prepo_kernels.backends import registry

    case = make_case(6, 8, 40)
    used = []
    real = registry.get
    monkeypatch.setattr(registry, "get", lambda name: used.append(name) or real(name))
    run("auto", F64, case)
    assert used == [registry.resolve("auto", torch.device("cpu"))]
    monkeypatch.setenv("PREPO_KERNELS_IMPL", "torch")
    run("auto", F64, case)
    assert used[-1] == "torch"
    for impl in ("cuda", "fastest"):
        with pytest.raises(Exception) as lle_error:
            linear_logprob_entropy(case["hidden"], case["weight"], case["targets"], impl=impl)
        with pytest.raises(type(lle_error.value), match=re.escape(str(lle_error.value).split(":")[0])):
            run(impl, F64, case)
    assert registry.get("cuda").grpo_chunks is None and registry.get("torch").grpo_chunks is not None


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    """Without a CUDA device and with TRITON_INTERPRET unset, impl="triton" raises the registry's reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        run("triton", F64, make_case(4, 8, 30))


@pytest.mark.parametrize("impl", FUSED)
def test_zero_dim_advantage(impl):
    """One advantage for every token (a 0-d tensor)."""
    case = make_case(9, 8, 40, zero_adv_frac=0.0, ignore_frac=0.0)
    case["adv"] = torch.tensor(-0.7, dtype=F64)
    assert_close_to_truth(impl, F64, case, 1e-9)


@pytest.mark.parametrize("impl", FUSED)
def test_backward_moves_the_gradients_without_copies(impl, monkeypatch):
    """The weight's .grad is the one-pass path's own tensor (moved, not copied)."""
    calls = spy_one_pass(monkeypatch)
    case = make_case(6, 8, 40, bias=False, ignore_frac=0.0, zero_adv_frac=0.0)
    w = case["weight"].clone().requires_grad_()
    linear_grpo_loss(case["hidden"], w, case["targets"], case["old"], case["adv"], impl=impl)[0].backward()
    assert w.grad.data_ptr() == calls[0][2]
