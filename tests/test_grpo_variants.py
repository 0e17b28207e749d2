"""linear_grpo_loss for every variant of TRL's GRPO loss, every backend, against the float64
reference (materialized logits through the same objective): loss and the hidden / weight / bias
gradients; one-pass variants do not materialize anything and take three matmuls, two-pass variants
go through linear_logprob_entropy. The objective itself is held to TRL's own _compute_loss by
tests/test_trl_integration.py."""
import pytest
import torch

from kernel_harness import F64, interpreter_warnings, make_inputs, skip_reason
from prepo_kernels import GRPOLossParams, linear_grpo_loss, linear_logprob_entropy
from prepo_kernels.backends import grpo_chunks

IMPLS = [pytest.param(i, marks=[pytest.mark.skip(reason=skip_reason(i, "cpu"))] if skip_reason(i, "cpu") else [])
         for i in ("torch", "cpu", "triton")]
pytestmark = interpreter_warnings
B, T, D, V = 3, 6, 8, 37

VARIANTS = {
    "dapo": GRPOLossParams(),
    "grpo-kl": GRPOLossParams(loss_type="grpo", beta=0.04),
    "grpo-kl-bias-corrected": GRPOLossParams(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    "bnpo-delta": GRPOLossParams(loss_type="bnpo", delta=1.3),
    "dr_grpo": GRPOLossParams(loss_type="dr_grpo", max_completion_length=8),
    "cispo": GRPOLossParams(loss_type="cispo", eps_high=1.25),
    "sapo-entropy": GRPOLossParams(loss_type="sapo", entropy_coef=0.05),
    "luspo-token": GRPOLossParams(loss_type="luspo"),
    "dapo-entropy-kl": GRPOLossParams(entropy_coef=0.1, beta=0.02, use_bias_correction_kl=True),
    # two passes
    "grpo-sequence": GRPOLossParams(loss_type="grpo", importance_sampling_level="sequence"),
    "luspo-sequence-kl": GRPOLossParams(loss_type="luspo", importance_sampling_level="sequence", beta=0.03,
                                        use_bias_correction_kl=True),
    "vespo": GRPOLossParams(loss_type="vespo"),
    "dapo-quantile-entropy": GRPOLossParams(top_entropy_quantile=0.6, entropy_coef=0.05),
    "bnpo-off-policy": GRPOLossParams(loss_type="bnpo", off_policy_mask_threshold=0.3),
    "sapo-sequence-quantile": GRPOLossParams(loss_type="sapo", importance_sampling_level="sequence",
                                             top_entropy_quantile=0.5),
}


def make_case(seed=0, is_mode=None, weights=False):
    hidden, weight, targets, bias = make_inputs(B * T, D, V, bias=True, ignore_frac=0.2, lead=(B, T), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lp, _ = linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=0.7, impl="reference")
    old = lp - (0.5 + 1.2 * torch.rand(B, T, dtype=F64, generator=gen)).log()  # ratios in [0.5, 1.7]
    ref = lp + 0.3 * torch.randn(B, T, dtype=F64, generator=gen)
    sampling = old + 0.05 * torch.randn(B, T, dtype=F64, generator=gen)
    adv = torch.randn(B, 1, dtype=F64, generator=gen)
    adv[1] = 0.0  # a zero-advantage sequence: skipped by the one-pass path where nothing else needs it
    case = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, old_logprob=old, advantages=adv,
                ref_logprob=ref, sampling_logprob=sampling)
    if is_mode == "token":
        case["importance_sampling_ratio"] = (0.6 + 0.8 * torch.rand(B, T, dtype=F64, generator=gen))
    elif is_mode == "sequence":
        case["importance_sampling_ratio"] = (0.6 + 0.8 * torch.rand(B, 1, dtype=F64, generator=gen))
    if weights:
        case["rollout_weights"] = torch.tensor([1.3, 0.7, 0.0], dtype=F64)
    return case


def run(impl, case, params, dtype=F64, **kwargs):
    leaves = [case[k].detach().to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")]
    extra = {k: v for k, v in case.items() if k not in ("hidden", "weight", "bias", "targets", "old_logprob",
                                                       "advantages")}
    loss, stats = linear_grpo_loss(leaves[0], leaves[1], case["targets"], case["old_logprob"], case["advantages"],
                                   bias=leaves[2], temperature=0.7, params=params, impl=impl, compute_entropy=True,
                                   **extra, **kwargs)
    loss.backward()
    return [loss.detach().to(F64)] + [t.grad.to(F64) for t in leaves], stats


def assert_matches_reference(impl, case, params, tol=1e-10, **kwargs):
    want, _ = run("reference", case, params, **kwargs)
    got, stats = run(impl, case, params, **kwargs)
    for name, w, g in zip(("loss", "d_hidden", "d_weight", "d_bias"), want, got):
        assert torch.allclose(g, w, rtol=tol, atol=tol), f"{impl} {name}: max err {(g - w).abs().max():.3g}"
    assert want[0].abs() > 1e-6  # a loss that can tell a wrong implementation
    return stats


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_every_variant_matches_the_reference_in_float64(impl, variant):
    assert_matches_reference(impl, make_case(), VARIANTS[variant])


@pytest.mark.parametrize("is_mode", ["token", "sequence"])
@pytest.mark.parametrize("variant", ["dapo-entropy-kl", "grpo-sequence", "vespo", "cispo"])
@pytest.mark.parametrize("impl", IMPLS)
def test_vllm_importance_sampling_and_rollout_weights(impl, variant, is_mode):
    assert_matches_reference(impl, make_case(seed=3, is_mode=is_mode, weights=True), VARIANTS[variant],
                             num_tokens=11.0, accumulation_steps=2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_on_policy_without_old_logprob(impl):
    case = make_case(seed=5)
    case["old_logprob"] = None
    for variant in ("grpo-kl-bias-corrected", "sapo-entropy", "grpo-sequence"):
        assert_matches_reference(impl, case, VARIANTS[variant])


@pytest.mark.parametrize("impl", IMPLS)
def test_one_pass_takes_the_chunks_and_skips_rows_without_gradient(impl, monkeypatch):
    """One-pass variants run the backend's chunks on the rows with a gradient only (the zero-advantage
    sequence is skipped without KL or entropy bonus, kept with them); two-pass variants never do."""
    seen = []
    real = grpo_chunks.one_pass_fwdbwd
    monkeypatch.setattr("prepo_kernels.grpo_loss.one_pass_fwdbwd",
                        lambda chunks, h, *a: seen.append(h.shape[0]) or real(chunks, h, *a))
    case = make_case()
    valid = int((case["targets"] != -100).sum())
    zero_row = int((case["targets"][1] != -100).sum())
    stats = assert_matches_reference(impl, case, VARIANTS["dapo"])
    assert seen == [valid - zero_row] and not stats.computed[1].any()
    assert_matches_reference(impl, case, VARIANTS["grpo-kl"])
    assert seen[-1] == valid
    assert_matches_reference(impl, case, VARIANTS["grpo-sequence"])
    assert len(seen) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_a_chunk_without_the_entropy_term_fails_this_suite(impl, monkeypatch):
    """The suite can fail: chunks that drop the entropy's gradient disagree with the reference."""
    from prepo_kernels.backends import registry

    chunks = registry.get(impl).grpo_chunks
    backward = type(chunks).backward
    monkeypatch.setattr(type(chunks), "backward", lambda self, s, g, e, *a: backward(self, s, g, None, *a))
    with pytest.raises(AssertionError):
        assert_matches_reference(impl, make_case(), VARIANTS["sapo-entropy"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_within_reference_error(impl, dtype):
    """The suite's criterion (kernel_harness): |truth - impl| <= |truth - same-dtype reference| +
    tol (1 + |truth|), truth the float64 reference on the inputs rounded to ``dtype``."""
    case = make_case(seed=7)
    for k in ("hidden", "weight", "bias"):
        case[k] = case[k].to(dtype).to(F64)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for variant in ("dapo-entropy-kl", "vespo"):
        truth, _ = run("reference", case, VARIANTS[variant])
        ref, _ = run("reference", case, VARIANTS[variant], dtype=dtype)
        got, _ = run(impl, case, VARIANTS[variant], dtype=dtype)
        for t, r, g in zip(truth, ref, got):
            assert torch.all((t - g).abs() <= (t - r).abs() + tol * (1 + t.abs())), variant


def test_several_chunks(monkeypatch):
    monkeypatch.setattr(grpo_chunks, "chunk_rows", lambda vocab: 4)
    for impl in ("torch", "cpu"):
        assert_matches_reference(impl, make_case(seed=9), VARIANTS["dapo-entropy-kl"])


@pytest.mark.parametrize("bad, match", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(importance_sampling_level="row"), "importance_sampling_level"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
    (dict(beta=float("nan")), "beta"),
    (dict(delta=-1.0), "delta"),
])
def test_bad_params(bad, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossParams(**bad)


def test_kl_needs_reference_logprobs():
    case = make_case()
    del case["ref_logprob"]
    with pytest.raises(ValueError, match="ref_logprob"):
        run("torch", case, VARIANTS["grpo-kl"])
