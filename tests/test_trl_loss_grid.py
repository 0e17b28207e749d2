"""PrepoGRPOTrainer._compute_loss (prepo_kernels.linear_grpo_loss on the decoder's hidden states)
against TRL's own GRPOTrainer._compute_loss (full logits, TRL's log-probs) on the same tiny real
Qwen2 and the same batch, over TRL's loss options: loss_type x importance_sampling_level x beta x
entropy_coef x top_entropy_quantile x vLLM importance-sampling mode, plus delta, the off-policy mask
and the adaptive entropy bonus. Loss, every parameter's gradient and the logged metrics agree, and the
fused op is the one that ran."""
import itertools

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytestmark = pytest.mark.slow

from trl import GRPOTrainer  # noqa: E402

import prepo.integrations.trl as prepo_trl  # noqa: E402
from prepo_kernels.hf import position_ids  # noqa: E402
from test_trl_integration import load_model, make_config, prompt_dataset, reward_chars  # noqa: E402

B, P, C = 4, 3, 5  # completions, prompt length (left-padded), completion length
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


@pytest.fixture(scope="module")
def trainer(tiny_qwen2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    args = make_config(tmp_path_factory.mktemp("grid"), prepo_curriculum=False, prepo_entropy_weighting=False,
                       max_completion_length=C)
    t = prepo_trl.PrepoGRPOTrainer(model=load_model(tiny_qwen2_dir), reward_funcs=reward_chars, args=args,
                                   train_dataset=prompt_dataset(),
                                   processing_class=AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    t.model.train()
    t.current_gradient_accumulation_steps = 2
    return t


def make_batch(trainer, dtype, is_mode, seed=0, left_pad=True):
    """A batch as TRL's _generate_and_score_completions leaves it: prompts (left-padded unless not
    ``left_pad``), completions with trailing padding, advantages of both signs and one 0, old /
    reference / sampling log-probs near the policy's (ratios on both sides of the clip range) and
    vLLM's ratios."""
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    if left_pad:
        prompt_mask[0, 0] = prompt_mask[2, :2] = 0
    completion_ids = torch.randint(0, vocab, (B, C), generator=gen)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 3:] = completion_mask[3, 1:] = 0
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([0.9, -0.7, 0.0, -1.3], dtype=dtype),
                  num_items_in_batch=completion_mask.sum().to(dtype) * 2)
    with torch.no_grad():
        trainer.args.prepo_fused_logprobs = False
        lp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C)
        trainer.args.prepo_fused_logprobs = True
    noise = lambda scale: scale * torch.randn(B, C, generator=gen, dtype=dtype)  # noqa: E731
    inputs["old_per_token_logps"] = lp - torch.log(0.55 + 1.1 * torch.rand(B, C, generator=gen, dtype=dtype))
    inputs["ref_per_token_logps"] = lp + noise(0.3)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + noise(0.2)
    if is_mode is not None:
        shape = (B, C) if is_mode == "token" else (B, 1)
        inputs["importance_sampling_ratio"] = 0.7 + 0.6 * torch.rand(shape, generator=gen, dtype=dtype)
    return inputs


def configure(trainer, **opts):
    """Set TRL's loss options on the built trainer, where _compute_loss reads them."""
    t, a = trainer, trainer.args
    t.loss_type = opts.get("loss_type", "dapo")
    t.importance_sampling_level = opts.get("level", "token")
    t.beta = opts.get("beta", 0.0)
    a.use_bias_correction_kl = opts.get("bias_correction", True)
    t.entropy_coef = opts.get("entropy_coef", 0.0)
    t.use_adaptive_entropy = opts.get("adaptive", False)
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t._last_world_entropy, t._entropy_window_stats = opts.get("last_entropy", float("inf")), None
    t.top_entropy_quantile = opts.get("quantile", 1.0)
    t.use_vllm = t.vllm_importance_sampling_correction = opts.get("is_mode") is not None
    t.off_policy_mask_threshold = opts.get("off_policy", None)
    a.delta = opts.get("delta", None)


def loss_and_grads(trainer, inputs, fused: bool):
    """(loss, [each parameter's gradient], metrics appended) of one _compute_loss call."""
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    state = (trainer.entropy_coef, trainer._last_world_entropy)
    if fused:
        loss = trainer._compute_loss(trainer.model, inputs)
    else:
        trainer.args.prepo_fused_logprobs = False
        try:
            loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        finally:
            trainer.args.prepo_fused_logprobs = True
    loss.backward()
    trainer.entropy_coef, trainer._last_world_entropy = state  # both calls see the same controller state
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for p in trainer.model.parameters()]
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}


def assert_same(trainer, inputs, monkeypatch, rtol):
    calls = []
    real = prepo_trl.linear_grpo_loss
    monkeypatch.setattr(prepo_trl, "linear_grpo_loss", lambda *a, **k: calls.append(k["params"]) or real(*a, **k))
    ours = loss_and_grads(trainer, inputs, fused=True)
    theirs = loss_and_grads(trainer, inputs, fused=False)
    assert len(calls) == 1, "the fused op was not the one called"
    # atol: the loss sums per-token terms of order 1 (and of both signs), so its rounding is absolute
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=rtol)
    for (name, _), a, b in zip(trainer.model.named_parameters(), ours[1], theirs[1]):
        err = torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-30)
        assert err <= rtol, f"{name}: gradient {err:.3g} relative (norm)"
    assert ours[2].keys() == theirs[2].keys()
    for k in ours[2]:
        assert ours[2][k] == pytest.approx(theirs[2][k], rel=rtol * 10, abs=1e-6), k
    return ours


def full_logits_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                      compute_aux_loss=False, **extras):
    """TRL's _get_per_token_logps_and_entropies from materialized logits, with the fused path's position
    ids (counted from the mask: TRL's call leaves them to the model, which counts padding too, and
    rotary embeddings computed in float32 at other absolute positions differ at float32 rounding)."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask)).last_hidden_state
    logits = model.lm_head(hidden[:, -logits_to_keep - 1 : -1]) / self.temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1) if compute_entropy else None, None


GRID = list(itertools.product(LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (0.0, 0.05), (1.0, 0.5),
                              (None, "token", "sequence")))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_loss_equals_trls_on_the_grid_fp32(trainer, monkeypatch, loss_type):
    """TRL's own path, unpatched. Prompts without left padding: TRL's model call leaves the position
    ids to the model, which counts padding, and the fused path counts them from the mask; rotary
    embeddings in float32 at shifted absolute positions differ at float32 rounding, which is the
    model's, not the loss's (the float64 test below covers left padding)."""
    trainer.model.float()
    for mode in (None, "token", "sequence"):
        inputs = make_batch(trainer, torch.float32, mode, left_pad=False)
        for _, level, beta, coef, quantile, is_mode in (g for g in GRID if g[0] == loss_type and g[5] == mode):
            opts = dict(loss_type=loss_type, level=level, beta=beta, entropy_coef=coef, quantile=quantile,
                        is_mode=is_mode)
            configure(trainer, **opts)
            try:
                assert_same(trainer, inputs, monkeypatch, rtol=1e-5)
            except AssertionError as exc:
                raise AssertionError(f"{opts}: {exc}") from None


@pytest.mark.parametrize("opts", [
    dict(loss_type="dapo", delta=1.35),
    dict(loss_type="grpo", level="sequence", delta=1.1, beta=0.04, bias_correction=False),
    dict(loss_type="bnpo", off_policy=0.05),
    dict(loss_type="dapo", off_policy=0.05, is_mode="token", quantile=0.6),
    dict(loss_type="sapo", entropy_coef=0.05, adaptive=True, last_entropy=0.0),
    dict(loss_type="cispo", entropy_coef=0.05, adaptive=True, last_entropy=1e9),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fused_loss_equals_trls_fp64_and_extra_options(trainer, monkeypatch, opts):
    """In float64, with TRL's log-probs and entropies from the full float64 logits (TRL's own fused
    head computes them in float32), so that only the loss's own arithmetic is compared."""
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", full_logits_logps)
    trainer.model.double()
    try:
        inputs = make_batch(trainer, torch.float64, opts.get("is_mode"), seed=4)
        configure(trainer, **opts)
        assert_same(trainer, inputs, monkeypatch, rtol=1e-10)
    finally:
        trainer.model.float()


def test_a_wrong_objective_fails_the_grid(trainer, monkeypatch):
    """The grid can fail: the fused loss with the KL's bias correction dropped differs from TRL's."""
    trainer.model.float()
    inputs = make_batch(trainer, torch.float32, None)
    configure(trainer, loss_type="grpo", beta=0.04)
    real = prepo_trl.PrepoGRPOTrainer.loss_params
    monkeypatch.setattr(prepo_trl.PrepoGRPOTrainer, "loss_params",
                        lambda self, mode: __import__("dataclasses").replace(real(self, mode),
                                                                             use_bias_correction_kl=False))
    with pytest.raises(AssertionError):
        assert_same(trainer, inputs, monkeypatch, rtol=1e-5)
