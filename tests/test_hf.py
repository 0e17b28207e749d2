"""causal_lm_logprob_entropy on real (tiny, random) Hugging Face models."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from prepo_kernels import causal_lm_logprob_entropy, logprob_entropy_from_logits

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny(config_cls, **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**SMALL, **extra)).double().eval()


@pytest.mark.parametrize("config_cls", [Qwen2Config, LlamaConfig])
def test_matches_model_logits_with_left_padding(config_cls):
    model = tiny(config_cls)
    input_ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    lp, ent = causal_lm_logprob_entropy(model, input_ids, mask, temperature=0.7)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1]
    targets = torch.where(mask[:, 1:].bool() & mask[:, :-1].bool(), input_ids[:, 1:], -100)
    lp_ref, ent_ref = logprob_entropy_from_logits(logits, targets, temperature=0.7, impl="reference")
    torch.testing.assert_close(lp, lp_ref.float() if lp.dtype == torch.float32 else lp_ref)
    torch.testing.assert_close(ent, ent_ref.to(ent.dtype))
    assert (lp[1, :4] == 0).all() and (lp[2, 6:] == 0).all()
    # the unpadded row is the same whether or not other rows are padded
    alone, _ = causal_lm_logprob_entropy(model, input_ids[1:2, 4:], temperature=0.7)
    torch.testing.assert_close(lp[1, 4:], alone[0])


def test_gradient_reaches_the_model():
    model = tiny(Qwen2Config)
    input_ids = torch.randint(0, 97, (2, 6))
    lp, ent = causal_lm_logprob_entropy(model, input_ids)
    (lp.sum() + ent.sum()).backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_softcapped_model_is_refused():
    model = tiny(Gemma2Config, head_dim=8, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_logprob_entropy(model, torch.randint(0, 97, (1, 4)))


def test_non_linear_head_is_refused():
    model = tiny(LlamaConfig)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 97))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        causal_lm_logprob_entropy(model, torch.randint(0, 97, (1, 4)))


def test_bad_input_ids():
    model = tiny(LlamaConfig)
    with pytest.raises(ValueError, match="T >= 2"):
        causal_lm_logprob_entropy(model, torch.randint(0, 97, (1, 1)))
    with pytest.raises(ValueError, match="attention_mask shape"):
        causal_lm_logprob_entropy(model, torch.randint(0, 97, (1, 4)), torch.ones(1, 3))
