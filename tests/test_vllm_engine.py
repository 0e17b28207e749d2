"""prepo.vllm_engine without vLLM (it cannot run on this project's machines): the missing-extra
error, the sampling-option and weight-name mappings, the rollout layout, and the engine's
bookkeeping against a stand-in ``vllm`` module that accepts only the names vLLM 0.33.0 defines."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from prepo.prompts import PromptEncoder
from prepo.rollout import Rollouts, Sampling, completion_mask_from_ids
from prepo.vllm_engine import VLLMEngine, require_vllm, rollouts_from_tokens, sampling_params_kwargs, weight_names


def test_missing_vllm_names_the_extra(monkeypatch, qwen_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        require_vllm()
    with pytest.raises(ImportError, match=r"--rollout-engine vllm needs vLLM: pip install -e \.\[vllm\]"):
        VLLMEngine("some/model", qwen_tokenizer, PromptEncoder(qwen_tokenizer), Sampling(8))


def test_sampling_params_mapping():
    kw = sampling_params_kwargs(num_samples=8, max_new_tokens=64, temperature=0.7, top_p=0.95, top_k=None,
                                stop_token_ids=[5])
    assert kw == dict(n=8, temperature=0.7, top_p=0.95, top_k=0, max_tokens=64, stop_token_ids=[5],
                      logprobs=None, detokenize=False)
    assert sampling_params_kwargs(num_samples=2, max_new_tokens=4, top_k=20, stop_token_ids=[1])["top_k"] == 20
    greedy = sampling_params_kwargs(num_samples=4, max_new_tokens=16, temperature=0.7, greedy=True, stop_token_ids=[5])
    assert greedy == dict(n=1, temperature=0.0, max_tokens=16, stop_token_ids=[5], logprobs=None, detokenize=False)
    for bad, msg in [(dict(temperature=0.0), "temperature > 0"), (dict(top_p=0.0), "top_p"),
                     (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            sampling_params_kwargs(**{"num_samples": 2, "max_new_tokens": 8, "stop_token_ids": [0], **bad})


@pytest.mark.parametrize("model_dir", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_weight_names_are_the_checkpoint_names(model_dir, request):
    """vLLM builds its model from the checkpoint, so the names it loads are the checkpoint's keys;
    the policy's parameter names must map onto exactly those, also through wrappers."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(model_dir)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        checkpoint = set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(path)
    names = [n for n, _ in model.named_parameters()]
    assert set(weight_names(names).values()) == checkpoint
    assert weight_names(names) == {n: n for n in names}
    compiled = torch.compile(model)  # not run: only its parameter names
    assert set(weight_names(n for n, _ in compiled.named_parameters()).values()) == checkpoint
    wrapped = {f"module._fsdp_wrapped_module.{n}": n for n in names}
    assert weight_names(wrapped) == wrapped
    with pytest.raises(ValueError, match="LoRA"):
        weight_names(["model.layers.0.self_attn.q_proj.lora_A.default.weight"])


def test_rollouts_from_tokens_layout(qwen_tokenizer):
    tok = qwen_tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    enc = PromptEncoder(tok)
    ids, mask = enc(["What is 2+2?", "Hi"])
    ids, mask = ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    four, five, dot = (tok.encode(s)[0] for s in ("4", "5", "."))
    completions = [[four, dot, eos], [five, eos], [four, four, four, four], [dot, dot, dot, eos]]
    stopped = [True, True, False, True]
    ro = rollouts_from_tokens([0, 0, 1, 1], ids, mask, completions, stopped, tok)
    assert ro.completions == ["4.", "5", "4444", "..."]
    assert ro.completion_ids.tolist() == [[four, dot, eos, pad], [five, eos, pad, pad],
                                          [four] * 4, [dot, dot, dot, eos]]
    # the HF engine's mask (up to and including the first EOS) on the same tokens
    hf_mask = completion_mask_from_ids(torch.tensor([c + [eos] * (4 - len(c)) for c in completions]), eos)
    assert torch.equal(ro.completion_mask, hf_mask)
    assert torch.equal(ro.prompt_ids, ids) and ro.prompt_ids[3, 0] == pad  # left-padded
    full, full_mask, sl = ro.full_sequences()
    assert full.shape == (4, ids.shape[1] + 4) and full_mask[:, sl.start + 1:].sum() == ro.completion_mask.sum()
    assert len(Rollouts.concat([ro, ro.select([1])], pad)) == 5
    with pytest.raises(ValueError, match="must match"):
        rollouts_from_tokens([0], ids, mask, completions, stopped, tok)


# ------------------------------------------------------------------ a stand-in vllm module
# Names checked against vLLM 0.33.0: vllm/sampling_params.py (SamplingParams fields),
# vllm/entrypoints/llm.py (LLM.__init__ arguments and EngineArgs fields passed through **kwargs).
SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "logprobs", "detokenize"}
LLM_ARGS = {"model", "dtype", "seed", "gpu_memory_utilization", "max_model_len", "enable_sleep_mode"}


def fake_vllm(eos: int):
    calls = []

    class SamplingParams:
        def __init__(self, **kw):
            assert set(kw) <= SAMPLING_FIELDS, set(kw) - SAMPLING_FIELDS
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, **kw):
            assert set(kw) <= LLM_ARGS, set(kw) - LLM_ARGS
            calls.append(("init", kw))

        def generate(self, requests, params, use_tqdm=True):
            calls.append(("generate", [r["prompt_token_ids"] for r in requests], params.n))
            out = []
            for r in requests:
                samples = [types.SimpleNamespace(token_ids=[r["prompt_token_ids"][0], eos] if k % 2 else [7] * params.max_tokens,
                                                 finish_reason="stop" if k % 2 else "length") for k in range(params.n)]
                out.append(types.SimpleNamespace(outputs=samples))
            return out

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tags))

        def collective_rpc(self, method, kwargs=None):
            calls.append((method, [n for n, _ in kwargs["weights_iterator"]], kwargs["is_checkpoint_format"]))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

    mod = types.ModuleType("vllm")
    mod.__version__ = "0.33.0"
    mod.LLM, mod.SamplingParams, mod.TokensPrompt = LLM, SamplingParams, dict
    return mod, calls


def test_engine_bookkeeping_with_a_stand_in_vllm(monkeypatch, qwen_tokenizer, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    tok = qwen_tokenizer
    mod, calls = fake_vllm(tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = VLLMEngine(tiny_qwen2_dir, tok, PromptEncoder(tok), Sampling(3, temperature=0.9, top_p=0.8, top_k=5),
                        dtype=torch.bfloat16, gpu_memory_utilization=0.3, seed=3, chunk_prompts=2)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process: weights pushed without copies
    assert calls[0] == ("init", dict(model=str(tiny_qwen2_dir), dtype="bfloat16", seed=3, gpu_memory_utilization=0.3,
                                     max_model_len=None, enable_sleep_mode=True))
    prompts = ["1+1=", "2+2=", "3+3="]
    chunks = list(engine.generate(prompts, 4))
    assert [len(c) for c in chunks] == [8, 4]
    ro = Rollouts.concat(chunks, tok.pad_token_id)
    assert ro.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert calls[1] == ("generate", [engine.encoder.ids("1+1="), engine.encoder.ids("2+2=")], 4)
    assert ro.completion_mask.sum(dim=1).tolist() == [3, 2] * 6
    greedy = list(engine.generate(prompts[:1], 3, greedy=True))
    assert calls[-1] == ("generate", [engine.encoder.ids("1+1=")] * 3, 1)  # n=1, the prompt thrice
    assert len(greedy[0]) == 3

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    del calls[:]
    engine.sleep()
    engine.sleep()  # already asleep: nothing
    with pytest.raises(RuntimeError, match="asleep"):
        next(engine.generate(prompts, 1))
    engine.sync_weights(torch.compile(model))
    names = [n for n, _ in model.named_parameters()]
    assert calls == [("sleep", 2), ("wake_up", ["weights"]), ("reload_weights", names, True),
                     ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]
    assert len(list(engine.generate(prompts, 1))) == 2
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(tiny_qwen2_dir, tok, PromptEncoder(tok), Sampling(3), gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="temperature"):
        VLLMEngine(tiny_qwen2_dir, tok, PromptEncoder(tok), Sampling(3, temperature=0.0))
