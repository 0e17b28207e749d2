"""causal_lm_logprob_entropy on real (tiny, random) Hugging Face models."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

from prepo_kernels import causal_lm_logprob_entropy, logprob_entropy_from_logits

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


# GPT-2 learns absolute position embeddings: a wrong position id changes its logits (rotary models
# such as Qwen2 and Llama see only relative positions, so a shift of a left-padded row does not)
GPT2_SMALL = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)


def tiny(config_cls, **extra):
    torch.manual_seed(0)
    kwargs = GPT2_SMALL if config_cls is GPT2Config else SMALL
    return AutoModelForCausalLM.from_config(config_cls(**kwargs, **extra)).double().eval()


def unpadded_truth(model, input_ids, mask, temperature):
    """([B, T-1] log-prob, entropy) from each row's unpadded tokens run through the model alone
    (its own positions 0..n-1, no attention mask), log-softmax at ``temperature`` by hand; 0 where
    a token or its predecessor is padding. Nothing here shares the op's position or target code."""
    lp = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
    ent = torch.zeros_like(lp)
    for r in range(input_ids.shape[0]):
        cols = mask[r].nonzero().flatten().tolist()
        first, last = cols[0], cols[-1]
        assert cols == list(range(first, last + 1))   # one contiguous run of real tokens
        with torch.no_grad():
            logits = model(input_ids=input_ids[r : r + 1, first : last + 1]).logits[0, :-1].double() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        nxt = input_ids[r, first + 1 : last + 1]
        lp[r, first:last] = logp[torch.arange(len(nxt)), nxt]
        ent[r, first:last] = -(logp.exp() * logp).sum(-1)
    return lp, ent


@pytest.mark.parametrize("config_cls", [Qwen2Config, LlamaConfig, GPT2Config])
def test_matches_model_logits_with_left_padding(config_cls):
    model = tiny(config_cls)
    input_ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    lp, ent = causal_lm_logprob_entropy(model, input_ids, mask, temperature=0.7)
    lp_ref, ent_ref = unpadded_truth(model, input_ids, mask, 0.7)
    torch.testing.assert_close(lp.double(), lp_ref)
    torch.testing.assert_close(ent.double(), ent_ref)
    assert (lp[1, :4] == 0).all() and (lp[2, 6:] == 0).all()


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
