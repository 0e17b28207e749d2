"""The offline Qwen tokenizer the trainer tests use is the real one: token for token equal to
tiktoken on Qwen's own ranks, with a working chat template, and the tiny models load."""
import pytest

from conftest import QWEN2_PATTERN, QWEN_SPECIAL_TOKENS, qwen_tiktoken_path

TEXTS = [
    "Hello world! 12345 + 678 = ?",
    "Solve $x^2-4=0$. 解方程 \\boxed{2}\n\n  spaces",
    "What's   the answer?\r\nIt's 3/4, i.e. 75%.",
]


def test_matches_tiktoken(qwen_tokenizer):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(qwen_tiktoken_path())
    assert len(ranks) == 151_643
    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(QWEN_SPECIAL_TOKENS)})
    for text in TEXTS:
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == enc.encode(text)
        assert qwen_tokenizer.decode(enc.encode(text)) == text
    assert qwen_tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == [151_643, 151_644, 151_645]


def test_chat_template(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_tiny_models_load(fixture, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) == 151_646
