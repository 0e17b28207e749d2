"""The kernels on a real pretrained LM head: SmolLM2-135M-Instruct (its tied 49,152 x 576 embedding)
over real chat-formatted text, against the HF model's own logits in float64."""
import pytest
import torch

from kernel_harness import F64, random_grads, run, skip_reason
from prepo_kernels import causal_lm_logprob_entropy, logprob_entropy_from_logits

pytestmark = pytest.mark.slow
CHATS = [
    [{"role": "user", "content": "What is 27 + 8?"}, {"role": "assistant", "content": "27 + 8 = 35. The answer is 35."}],
    [{"role": "user", "content": "Anna has 12 apples. She gives 5 apples to Ben. How many apples does Anna have left?"},
     {"role": "assistant", "content": "12 - 5 = 7, so Anna has 7 apples left."}],
]


@pytest.fixture(scope="module")
def smollm2_f64(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=F64).eval()
    texts = [tok.apply_chat_template(c, tokenize=False) for c in CHATS]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]   # row 0 is left-padded
    return model, batch.input_ids, batch.attention_mask


def targets_of(ids, mask):
    return torch.where(mask[:, 1:].bool() & mask[:, :-1].bool(), ids[:, 1:], -100)


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_fused_head_on_real_hidden_states_is_no_worse_than_pytorch_fp32(smollm2_f64, impl):
    """fp32 fused log-prob, entropy, d hidden and d (tied) embedding vs the float64 truth on the
    model's real final hidden states: each output's largest error is no larger than plain fp32
    PyTorch's (the suite's criterion, taken over the tensor). Elementwise with tol 1e-9 it fails
    here: the logits reach |39|, an fp32 log-sum-exp is good to ~4e-6 whatever the log-prob's
    size, and where PyTorch's fp32 error happens to be 0 a fused value a few ulps off exceeds
    the bound (measured 1.1e-5 on log-probs, 4.8e-5 on the embedding gradient)."""
    if skip_reason(impl, "cpu"):
        pytest.skip(skip_reason(impl, "cpu"))
    model, ids, mask = smollm2_f64
    assert model.lm_head.weight is model.model.embed_tokens.weight                   # tied
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, :-1]
    targets = targets_of(ids, mask)
    low = [t.detach().float().double() for t in (hidden, model.lm_head.weight)]   # the fp32-rounded inputs
    for temperature in (1.0, 0.7):
        grads = random_grads(targets.shape)
        truth, plain, got = (run(i, "cpu", dt, *low, targets, None, temperature=temperature, grads=grads)
                             for i, dt in (("reference", F64), ("reference", torch.float32), (impl, torch.float32)))
        for name, t, r, x in zip(("logprob", "entropy", "d_hidden", "d_embedding"), truth, plain, got):
            err, err_plain = (t - x).abs().max().item(), (t - r).abs().max().item()
            assert err <= err_plain + 1e-9, f"{impl} {name} T={temperature}: max error {err:.3g} > fp32 PyTorch's {err_plain:.3g}"
        assert (got[0][targets == -100] == 0).all()


def test_causal_lm_matches_hf_logits_values_and_gradients(smollm2_f64):
    """causal_lm_logprob_entropy through the whole model (float64) == the HF forward's own logits
    -> log-softmax / entropy: values, the gradient w.r.t. the final hidden states and w.r.t. the
    tied embedding (which gets both the head's and the input lookup's gradient)."""
    model, ids, mask = smollm2_f64
    targets = targets_of(ids, mask)
    gen = torch.Generator().manual_seed(0)
    g, e = torch.randn(targets.shape, dtype=F64, generator=gen), torch.randn(targets.shape, dtype=F64, generator=gen)
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, out: captured.__setitem__("h", out) or out.retain_grad())

    def grads(fused: bool):
        model.zero_grad()
        if fused:
            lp, ent = causal_lm_logprob_entropy(model, ids, mask, temperature=0.7)
        else:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
            lp, ent = logprob_entropy_from_logits(logits, targets, temperature=0.7, impl="reference")
        ((lp * g).sum() + (ent * e).sum()).backward()
        return lp.detach(), ent.detach(), captured["h"].grad[:, :-1].clone(), model.model.embed_tokens.weight.grad.clone()

    try:
        got, want = grads(True), grads(False)
    finally:
        hook.remove()
    assert got[0].dtype == F64 and (got[0][targets == -100] == 0).all()
    for name, x, y in zip(("logprob", "entropy", "d_hidden"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    # The embedding's gradient also runs back through all 30 layers, which amplify differences
    # about 1e5-fold in this pretrained model: measured max difference 1.1e-5 on gradients up to
    # 78 (1.5e-7 relative; 2e-12 at the last layer's weights, the same with no padding), while two
    # runs of one path agree exactly. So: within 1e-6 of the gradient's largest entry.
    assert (got[3] - want[3]).abs().max() <= 1e-6 * want[3].abs().max()
    assert want[1][targets != -100].mean() > 0.1 and want[3].abs().sum() > 0     # a real, non-degenerate case


def test_trl_trainer_runs_two_steps_on_the_named_model(smollm2_dir, tmp_path, monkeypatch):
    """PrepoGRPOTrainer(model="smollm2-135m-instruct"): the name resolves to the cached folder (no
    second conversion) and two PREPO steps run on wordmath chats with the math reward."""
    pytest.importorskip("trl")
    import datasets

    from prepo import hub
    from prepo.integrations.trl import PrepoGRPOConfig, PrepoGRPOTrainer
    from prepo.rewards import math_reward
    from prepo.tasks import get_task

    monkeypatch.setenv("PREPO_CACHE", str(smollm2_dir.parent))
    monkeypatch.setattr(hub, "convert_gguf", lambda *a: pytest.fail("converted again"))
    problems = get_task("wordmath").generate(8, seed=0)
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p.prompt}] for p in problems],
                                       "answer": [p.answer for p in problems]})

    def correct(completions, answer, **kwargs):
        return math_reward([c[0]["content"] for c in completions], answer)

    args = PrepoGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                           max_completion_length=8, max_steps=2, learning_rate=1e-6, logging_steps=1,
                           save_strategy="no", report_to="none", use_cpu=True, seed=0, bf16=False,
                           prepo_candidate_multiple=2, temperature=0.7, dataloader_num_workers=0)
    trainer = PrepoGRPOTrainer(model="smollm2-135m-instruct", reward_funcs=correct, args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(h["prepo/candidates_scored"] == 4 and h["prepo/weight_min"] <= 1.0 <= h["prepo/weight_max"] for h in logs)
