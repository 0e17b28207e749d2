"""PREPO's pure verl parts against a real verl install: its DataProto, the v1 trainer's TensorDict
batches (verl's own collate_fn / tensordict_utils), its GRPO advantages and its nested-log-prob
slicing (response_from_nested)."""
import math

import numpy as np
import pytest
import torch

import prepo_kernels
from prepo.integrations.verl_ops import (chat_prompt_spans, perplexity_from_response_log_probs,
                                         prompt_scoring_fields, select_window, weight_advantages)
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import collate_fn
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.utils.padding import response_from_nested


def reference_window(ppl, k, rho):
    """Brute force: sort ascending, K consecutive from floor(rho * (n - K))."""
    order = sorted(range(len(ppl)), key=lambda i: (ppl[i], i))
    start = math.floor(rho * (len(ppl) - k))
    return order[start : start + k]


def v1_candidate_batch(n):
    """A candidate batch as the v1 trainer's _next_train_batch builds it (collate_fn -> TensorDict)."""
    rows = [{"raw_prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}], "index": i,
             "dummy_tensor": torch.tensor([0], dtype=torch.uint8), "extra_info": {"i": i}} for i in range(n)]
    batch = collate_fn(rows)
    batch["uid"] = np.array([f"uid{i}" for i in range(n)], dtype=object)
    td = tu.get_tensordict(batch)
    tu.assign_non_tensor_data(td, "global_steps", 7)
    return td


@pytest.mark.parametrize("n,k", [(10, 2), (15, 3), (7, 7), (5, 1)])
@pytest.mark.parametrize("rho", [0.0, 0.37, 0.5, 1.0])
def test_select_window_tensordict(n, k, rho):
    g = torch.Generator().manual_seed(n * 100 + k)
    ppl = torch.rand(n, generator=g) * 10 + 1
    selected, idx = select_window(v1_candidate_batch(n), ppl, rho, k)
    expected = reference_window(ppl.tolist(), k, rho)
    assert idx.tolist() == expected
    assert list(selected["index"]) == expected
    assert [m[0]["content"] for m in selected["raw_prompt"]] == [f"what is {i} + {i} ?" for i in expected]
    assert list(selected["uid"]) == [f"uid{i}" for i in expected]
    assert selected["global_steps"] == 7 and selected.batch_size == torch.Size([k])


def test_select_window_dataproto_and_ties():
    n, k = 12, 4
    data = DataProto.from_dict(tensors={"input_ids": torch.arange(n * 3).view(n, 3)},
                               non_tensors={"uid": np.array([f"u{i}" for i in range(n)], dtype=object)})
    ppl = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 5.0, 3.0, 4.0, 2.0, 6.0, 3.0, 1.0])
    for rho in (0.0, 0.25, 0.6, 1.0):
        selected, idx = select_window(data, ppl, rho, k)
        expected = reference_window(ppl.tolist(), k, rho)  # ties keep candidate order
        assert idx.tolist() == expected
        assert torch.equal(selected.batch["input_ids"], data.batch["input_ids"][expected])
        assert selected.non_tensor_batch["uid"].tolist() == [f"u{i}" for i in expected]


def test_select_window_bad_input():
    td = v1_candidate_batch(6)
    with pytest.raises(ValueError, match="shape"):
        select_window(td, torch.ones(5), 0.5, 2)
    with pytest.raises(ValueError, match="non-finite"):
        select_window(td, torch.tensor([1.0, 2, float("nan"), 3, 4, 5]), 0.5, 2)
    with pytest.raises(ValueError, match="rho"):
        select_window(td, torch.ones(6), 1.5, 2)
    with pytest.raises(ValueError, match="k <= n"):
        select_window(td, torch.ones(6), 0.5, 7)
    with pytest.raises(TypeError, match="DataProto"):
        select_window({"a": 1}, torch.ones(1), 0.5, 1)


def full_sequence_log_probs(model, seqs):
    """The actor's compute_log_prob output layout: per sequence, position t holds log p(x_{t+1} | x_<=t)
    (verl's logprobs_from_logits), the last position 0; jagged nested over the whole sequence."""
    out = []
    for s in seqs:
        logits = model(s.unsqueeze(0)).logits[0].float()
        lp = logprobs_from_logits(logits[:-1], s[1:], inplace_backward=False)
        out.append(torch.cat([lp, lp.new_zeros(1)]))
    return torch.nested.as_nested_tensor(out, layout=torch.jagged)


@torch.no_grad()
@pytest.mark.parametrize("scope", ["problem", "prompt"])
def test_prompt_perplexity_through_verl_layout(tokenizer, tiny_qwen2, scope):
    """The scoring samples score the ``ppl_scope`` span: the question's own tokens (problem), or
    every token after the first (prompt), each conditioned on the tokens before it."""
    questions = ["what is 1 + 2 ?", "solve the sum of 12 and 345 .", "?", "what is the sum of 9 and 9 and 9 ?"]
    conversations = [[{"role": "system", "content": "solve"}, {"role": "user", "content": q}] for q in questions]
    spans = chat_prompt_spans(tokenizer, conversations, ppl_scope=scope)
    ids = [s for s, _, _ in spans]
    assert tokenizer.convert_ids_to_tokens(ids[0])[-2:] == ["<|im_start|>", "assistant"]  # generation prompt
    fields = prompt_scoring_fields(spans)
    for i, (s, lo, hi) in enumerate(spans):
        if scope == "prompt":
            assert (lo, hi) == (1, len(s))
        else:
            assert s[lo:hi] == tokenizer(questions[i], add_special_tokens=False)["input_ids"]
        assert fields["prompts"][i].tolist() == s[:lo] and fields["responses"][i].tolist() == s[lo:hi]
        assert fields["input_ids"][i].tolist() == s[:hi]
        assert fields["position_ids"][i].tolist() == list(range(hi))
        assert fields["response_mask"][i].tolist() == [1] * (hi - lo)
    seqs = [torch.tensor(s[:hi]) for s, _, hi in spans]
    log_probs = response_from_nested(full_sequence_log_probs(tiny_qwen2, seqs), fields["response_mask"])
    ppl = perplexity_from_response_log_probs(log_probs)

    # float64 reference: exp(-mean log p) of the span's tokens, each given the whole prefix
    model64 = tiny_qwen2.double()
    try:
        ref = torch.stack([torch.exp(-torch.log_softmax(model64(torch.tensor([s])).logits[0, :-1], -1)
                                     .gather(-1, torch.tensor(s[1:])[:, None])[lo - 1 : hi - 1].mean())
                           for s, lo, hi in spans])
    finally:
        tiny_qwen2.float()
    torch.testing.assert_close(ppl.double(), ref, rtol=1e-5, atol=1e-6)
    if scope == "prompt":   # and the project's own fused scorer on the same ids agrees
        lp, _ = prepo_kernels.causal_lm_logprob_entropy(tiny_qwen2, seqs[1].unsqueeze(0), compute_entropy=False)
        torch.testing.assert_close(ppl[1], prepo_kernels.sequence_perplexity(lp, None)[0], rtol=1e-5, atol=1e-6)


def test_prompt_scoring_fields_bad_input():
    with pytest.raises(ValueError, match="no prompts"):
        prompt_scoring_fields([])
    with pytest.raises(ValueError, match=r"prompts \[1, 2\] have no token to score after their first"):
        prompt_scoring_fields([([1, 2, 3], 1, 3), ([4], 1, 1), ([4, 5], 0, 2)])
    with pytest.raises(ValueError, match="nested"):
        perplexity_from_response_log_probs(torch.zeros(2, 3))


def grpo_batch(n_groups=3, group=4, t=9, seed=0):
    """A DataProto after verl's GRPO advantage step, plus old-log-prob-pass entropies."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * group
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = 1  # a one-token response
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    rewards = torch.zeros(n, t)
    rewards[torch.arange(n), lengths - 1] = torch.randint(0, 2, (n,), generator=g).float()
    uid = np.repeat(np.array([f"g{i}" for i in range(n_groups)], dtype=object), group)
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, uid)
    entropy = torch.rand(n, t, generator=g) * 3 * mask + 100.0 * (1 - mask)  # junk past the mask
    return DataProto.from_dict(tensors={"advantages": adv, "entropy": entropy, "response_mask": mask},
                               non_tensors={"uid": uid})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_advantages_matches_reference(seed):
    data = grpo_batch(seed=seed)
    adv0 = data.batch["advantages"].clone()
    ent, mask = data.batch["entropy"].double(), data.batch["response_mask"].double()
    h_i = (ent * mask).sum(1) / mask.sum(1)
    h_bar = (ent * mask).sum() / mask.sum()
    w_ref = h_i / h_bar
    w = weight_advantages(data)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(data.batch["advantages"].double(), adv0.double() * w_ref[:, None], rtol=1e-5, atol=1e-6)
    lengths = mask.sum(1)
    torch.testing.assert_close((lengths * w).sum() / lengths.sum(), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    assert not w.requires_grad


def test_weight_advantages_equal_entropies_and_zero_rows():
    data = grpo_batch()
    mask = data.batch["response_mask"]
    data.batch["entropy"] = torch.full_like(mask, 0.7)
    adv0 = data.batch["advantages"].clone()
    torch.testing.assert_close(weight_advantages(data), torch.ones(len(data)))
    torch.testing.assert_close(data.batch["advantages"], adv0)
    # verl's padding rows (upsample_batch_to_divisible_size) have no response tokens: weight 0
    data.batch["response_mask"][-1] = 0
    data.batch["entropy"] = torch.rand(mask.shape) + 0.1
    assert weight_advantages(data)[-1] == 0


def test_weight_advantages_bad_input():
    data = grpo_batch()
    data.pop(batch_keys=["entropy"])
    with pytest.raises(KeyError, match="entropy"):
        weight_advantages(data)
    data = grpo_batch()
    data.batch["entropy"] = data.batch["entropy"][:, :-1].contiguous()
    with pytest.raises(ValueError, match="same"):
        weight_advantages(data)
