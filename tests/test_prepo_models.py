"""The trainer on real Hugging Face parts, on the CPU, with no downloads: tiny random Qwen2 / Llama
models with Qwen's real BPE tokenizer and ChatML template (tests/conftest.py), user data from
jsonl, a verl-schema parquet with bad rows and a ``save_to_disk`` directory, through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [(f"What is {a} plus {b}?", str(a + b)) for a in range(1, 5) for b in range(1, 4)]   # 12 rows
SMALL = {"total_steps": 2, "candidate_batch_size": 4, "select_ratio": 0.5, "group_size": 2, "max_new_tokens": 4,
         "spearman_prompts": 0, "eval_avg_k": 0, "progress": False, "tensorboard": False, "save_every": 0}


def small(**over) -> list[str]:
    """The SMALL settings with overrides, as command-line arguments."""
    out = []
    for k, v in {**SMALL, **over}.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _verl_rows(pairs):
    return [{"data_source": "toy", "prompt": [{"role": "user", "content": q}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"index": i}}
            for i, (q, a) in enumerate(pairs)]


def _main(args) -> int:
    from prepo.train import main

    return main([str(a) for a in args])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parity_reward(tmp_path_factory) -> str:
    """A --reward spec whose rewards vary within a group (the random tiny models never solve a
    problem, so the math checker would give all-zero advantages and no gradient)."""
    path = tmp_path_factory.mktemp("reward") / "parity.py"
    path.write_text("def score(prompts, completions, **columns):\n"
                    "    return [float(len(c) % 2) for c in completions]\n")
    return f"{path}:score"


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = _write_jsonl(d / "train.jsonl", [{"prompt": q, "answer": a} for q, a in QUESTIONS[:9]])
    # MATH-500's layout: the prompt is `problem`; the answer column is renamed too, to test the flag
    evals = _write_jsonl(d / "eval.jsonl", [{"problem": q, "final": a, "level": 1} for q, a in QUESTIONS[9:]])
    return train, evals


EVAL_COLUMNS = ["--eval-prompt-column", "problem", "--eval-answer-column", "final"]


@pytest.mark.slow
def test_jsonl_chat_template_qwen2(tmp_path, tiny_qwen2_dir, jsonl_data, capsys):
    train, evals = jsonl_data
    out = tmp_path / "run"
    rc = _main(["--model", tiny_qwen2_dir, "--train-data", train, "--eval-data", evals, *EVAL_COLUMNS, "--chat-template",
                "--system-prompt", "You are a careful solver.", "--instruction-suffix",
                "Please reason step by step, and put your final answer within \\boxed{}.",
                "--output-dir", out, *small(spearman_prompts=3, spearman_samples=2, save_every=2)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollouts"] == 2 * 2 * 2                      # 2 steps x K=2 prompts x G=2
    assert rows[0]["ppl_window_lo"] > 1 and rows[-1]["eval_accuracy"] is not None
    summary = _summary(out)
    assert summary["data"]["train"]["examples"] == 9 and summary["data"]["eval"]["skipped"] == 0
    assert "accuracy_level1" in json.loads((out / "eval.jsonl").read_text().splitlines()[0])
    assert (out / "checkpoints" / "last.pt").is_file()


def test_prompt_format_applies_template_system_and_suffix(qwen_tokenizer):
    from prepo.prompts import PromptEncoder, PromptFormat

    fmt = PromptFormat(chat_template=True, system_prompt="SYS", instruction_suffix="Box it.")
    text = fmt.text("What is 1 plus 1?", qwen_tokenizer)
    assert text == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nWhat is 1 plus 1?\nBox it.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # a message list always gets the template; its own system message is kept
    chat = [{"role": "system", "content": "own"}, {"role": "user", "content": "Q"}]
    assert PromptFormat(instruction_suffix="S").text(chat, qwen_tokenizer).startswith("<|im_start|>system\nown")
    # plain strings without the flag: only the suffix
    assert PromptFormat(instruction_suffix="S").text("Q", qwen_tokenizer) == "Q\nS"
    enc = PromptEncoder(qwen_tokenizer, fmt)
    ids, mask = enc(["What is 1 plus 1?", "Hi"])
    assert ids.shape == mask.shape and mask[1, 0] == 0 and mask[0].all()   # left-padded
    assert ids[0, 0] == qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ValueError, match="no user message"):
        PromptFormat(instruction_suffix="S").messages([{"role": "system", "content": "x"}])


@pytest.mark.slow
def test_verl_parquet_with_bad_rows_and_user_reward(tmp_path, tiny_qwen2_dir, capsys):
    pd = pytest.importorskip("pandas")
    rows = _verl_rows(QUESTIONS[:8])
    rows.append({**rows[0], "prompt": None})                                      # no prompt
    rows.append({**rows[1], "reward_model": {"style": "rule", "ground_truth": None}})  # no answer
    train = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(train)
    seen = tmp_path / "seen.json"
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "import json\n"
        "def score(prompts, completions, **columns):\n"
        f"    json.dump(sorted(columns), open({str(seen)!r}, 'w'))\n"
        "    assert len(columns['data_source']) == len(completions)\n"
        "    return [float(len(c) % 2) for c in completions]\n")
    out = tmp_path / "run"
    assert _main(["--model", tiny_qwen2_dir, "--train-data", train, "--reward", f"{reward}:score",
                  "--output-dir", out, *small()]) == 0
    captured = capsys.readouterr()
    assert "2 skipped" in captured.out, captured.out
    info = _summary(out)["data"]["train"]
    assert info["examples"] == 8 and info["skipped"] == 2 and sum(info["skipped_reasons"].values()) == 2
    assert {"answer", "data_source", "extra_info", "ability"} <= set(json.loads(seen.read_text()))
    assert _summary(out)["initial_accuracy"] is None                              # no eval data: no evaluation


@pytest.mark.slow
def test_save_to_disk_llama(tmp_path, tiny_llama_dir):
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "ds"
    datasets.Dataset.from_list([{"question": q, "solution": a} for q, a in QUESTIONS]).save_to_disk(str(data))
    out = tmp_path / "run"
    assert _main(["--model", tiny_llama_dir, "--train-data", data, "--prompt-column", "question",
                  "--answer-column", "solution", "--chat-template", "--output-dir", out, *small()]) == 0
    assert _summary(out)["data"]["train"]["examples"] == len(QUESTIONS)
    assert len(_metrics(out)) == 2


def _final_params(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_microbatch_budget_and_checkpointing_do_not_change_the_update(tmp_path, tiny_qwen2_dir, jsonl_data,
                                                                     parity_reward):
    """Micro-batches of one row (gradients accumulated) and gradient checkpointing give the update
    of one whole-mini-batch pass, within float tolerance."""
    train, _ = jsonl_data
    common = ["--model", tiny_qwen2_dir, "--train-data", train, "--reward", parity_reward,
              *small(total_steps=1, lr=1e-2, group_size=4, mini_batches=1, max_new_tokens=6)]
    runs = {"whole": [], "micro": ["--max-tokens-per-microbatch", "1"],
            "ckpt": ["--max-tokens-per-microbatch", "1", "--gradient-checkpointing"]}
    params = {}
    for name, extra in runs.items():
        assert _main([*common, "--output-dir", tmp_path / name, "--save-every", "1", *extra]) == 0
        params[name] = _final_params(tmp_path / name)
        assert _metrics(tmp_path / name)[0]["grad_norm"] > 0
    # atol: AdamW's first step moves a weight by lr g / (|g| + 1e-8), so where g is near 0 (lm_head
    # rows of tokens the batch makes unlikely) a summation-order difference of ~1e-12 in g moves it
    # by lr * 1e-4 = 1e-6 (seen: 6 of lm_head's 4.9M weights)
    for name in ("micro", "ckpt"):
        for k, v in params["whole"].items():
            torch.testing.assert_close(params[name][k], v, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, k=k: f"{name}: {k}: {m}")
    m = {name: _metrics(tmp_path / name)[0] for name in runs}
    assert m["micro"]["loss"] == pytest.approx(m["whole"]["loss"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_runs_on_cpu(tmp_path, tiny_qwen2_dir, jsonl_data, parity_reward, dtype):
    train, evals = jsonl_data
    out = tmp_path / dtype
    assert _main(["--model", tiny_qwen2_dir, "--train-data", train, "--eval-data", evals, *EVAL_COLUMNS, "--dtype", dtype,
                  "--reward", parity_reward, "--output-dir", out, *small(group_size=4, max_new_tokens=6)]) == 0
    assert all(r["entropy_mean"] > 0 and r["grad_norm"] > 0 for r in _metrics(out))
    assert _summary(out)["final_accuracy"] is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_fails_at_start(tmp_path, capsys):
    assert _main(["--device", "cuda", "--output-dir", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_device_option():
    from prepo.config import parse_args
    from prepo.errors import ConfigError
    from prepo.preflight import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device must be"):
        parse_args(["--device", "gpu0"])


@pytest.mark.slow
def test_unknown_model_offline_names_the_id(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-m", "prepo.train", "--model", "no-such-org/no-such-model",
                          "--output-dir", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "model 'no-such-org/no-such-model'" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_real_command_line(tmp_path, tiny_qwen2_dir, jsonl_data):
    train, evals = jsonl_data
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "prepo.train", "--model", str(tiny_qwen2_dir), "--train-data",
                          str(train), "--eval-data", str(evals), *EVAL_COLUMNS, "--device", "auto", "--dtype", "fp32",
                          "--output-dir", str(out), *small()], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train data" in res.stdout and "held-out greedy accuracy" in res.stdout


def test_gradient_checkpointing_recomputes_layers(tiny_qwen2_dir):
    """--gradient-checkpointing is live although the run keeps the model in eval mode: the backward
    pass runs each decoder layer's forward again."""
    import prepo_kernels
    from prepo.policy import load_policy

    ids = torch.randint(0, 1000, (2, 6))
    for checkpointing, calls in ((False, 1), (True, 2)):
        model, _ = load_policy(tiny_qwen2_dir, torch.device("cpu"), gradient_checkpointing=checkpointing)
        mlp, n = model.get_decoder().layers[0].mlp, [0]
        forward = mlp.forward
        mlp.forward = lambda *a, **k: (n.__setitem__(0, n[0] + 1), forward(*a, **k))[1]
        lp, _ = prepo_kernels.causal_lm_logprob_entropy(model, ids, torch.ones_like(ids), compute_entropy=False)
        lp.sum().backward()
        assert n[0] == calls and not model.training


def test_vllm_engine_without_vllm_fails_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)   # import vllm -> ImportError, installed or not
    assert _main(["--rollout-engine", "vllm", "--output-dir", tmp_path]) == 2
    assert "pip install -e .[vllm]" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_rollouts_stop_at_any_stop_token(tiny_qwen2_dir):
    """The HF engine stops at the tokenizer's EOS and at the model's generation_config EOS ids (a
    base model's <|endoftext|> next to the chat template's <|im_end|>)."""
    from prepo.policy import load_policy
    from prepo.prompts import PromptEncoder
    from prepo.rollout import HFGenerateEngine, Sampling, completion_mask_from_ids

    ids = torch.tensor([[5, 7, 9, 7, 3], [9, 5, 5, 5, 5]])
    assert completion_mask_from_ids(ids, [7, 9]).tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert completion_mask_from_ids(ids, 9).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    model, tok = load_policy(tiny_qwen2_dir, torch.device("cpu"))
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [endoftext]
    engine = HFGenerateEngine(model, tok, PromptEncoder(tok), Sampling(max_new_tokens=3))
    assert engine.stop_ids == sorted({tok.eos_token_id, endoftext})
    ro = next(engine.generate(["Hi"], 2))
    assert ro.completion_ids.shape == (2, 3) and len(ro) == 2
