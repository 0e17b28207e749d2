"""``python -m prepo.score``: every usable row back with ``ppl`` and ``ppl_rank``, the same numbers
as the trainer's scoring, bad rows skipped and counted, one error line per bad input and no
half-written output; on a tiny Qwen2 with Qwen's real BPE tokenizer."""
import json

import numpy as np
import pytest
import torch

from prepo.microbatch import length_batches
from prepo.score import main

QUESTIONS = ["What is 2 + 3?", "Compute 17 - 9.", "Anna has 12 apples. She gives 5 to Ben. How many are left?",
             "What is 6 times 7?", "Calculate 100 + 23 + 4.", "3 + 4 = ?"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    rows = [{"prompt": q, "answer": i, "source": "wm", "extra": {"id": i}} for i, q in enumerate(QUESTIONS)]
    rows += [{"prompt": "", "answer": "1"}, {"prompt": "What is 1 + 1?"}]   # an empty prompt; no answer
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def expected_ppl(model_dir, prompts, **fmt):
    from prepo.policy import load_policy
    from prepo.prompts import PromptEncoder, PromptFormat
    from prepo.signals.scoring import prompt_perplexity

    model, tok = load_policy(model_dir, torch.device("cpu"))
    return prompt_perplexity(model, PromptEncoder(tok, PromptFormat(**fmt)), prompts).numpy()


def read_scored(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_scores_every_usable_row_with_all_columns(tmp_path, data, tiny_qwen2_dir, capsys):
    out = tmp_path / "scored.jsonl"
    rc = main(["--model", str(tiny_qwen2_dir), "--data", str(data), "--output", str(out), "--chat-template",
               "--instruction-suffix", "Answer with the number only.", "--batch-tokens", "100", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = read_scored(out)
    assert [r["prompt"] for r in rows] == QUESTIONS and [r["answer"] for r in rows] == list(range(len(QUESTIONS)))
    assert [r["extra"] for r in rows] == [{"id": i} for i in range(len(QUESTIONS))] and rows[0]["source"] == "wm"
    ppl = np.array([r["ppl"] for r in rows])
    want = expected_ppl(tiny_qwen2_dir, QUESTIONS, chat_template=True, instruction_suffix="Answer with the number only.")
    np.testing.assert_allclose(ppl, want, rtol=1e-5)
    assert [r["ppl_rank"] for r in rows] == np.argsort(np.argsort(want)).tolist()
    printed = capsys.readouterr().out
    assert "scored 6 prompts (2 rows skipped" in printed and "'empty prompt': 1" in printed and "prompts/s" in printed
    assert not list(tmp_path.glob(".scored*"))   # no temporary file left


def test_chat_prompts_and_scope_and_batching(tmp_path, tiny_qwen2_dir, capsys):
    """verl's layout (chat prompts, the answer under reward_model); the result does not depend on
    the micro-batching, and ``--ppl-scope prompt`` scores the template too; parquet output."""
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in QUESTIONS]
    data = write_jsonl(tmp_path / "verl.jsonl", [{"prompt": c, "reward_model": {"ground_truth": "1"}} for c in chats])
    got = {}
    for scope, tokens in (("problem", "40"), ("problem", "100000"), ("prompt", "100000")):
        out = tmp_path / f"{scope}{tokens}.parquet"
        assert main(["--model", str(tiny_qwen2_dir), "--data", str(data), "--output", str(out), "--ppl-scope", scope,
                     "--batch-tokens", tokens, "--no-progress"]) == 0, capsys.readouterr().err
        rows = read_scored(out)
        assert [r["prompt"] for r in rows] == chats and rows[0]["reward_model"] == {"ground_truth": "1"}
        got[scope, tokens] = np.array([r["ppl"] for r in rows])
    np.testing.assert_allclose(got["problem", "40"], got["problem", "100000"], rtol=1e-5)
    np.testing.assert_allclose(got["problem", "40"], expected_ppl(tiny_qwen2_dir, chats), rtol=1e-5)
    assert not np.allclose(got["prompt", "100000"], got["problem", "40"], rtol=1e-3)


def test_length_batches_cover_every_row_within_the_budget():
    lengths = [5, 30, 7, 7, 12, 64, 3, 30]
    batches = length_batches(lengths, 40)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)   # shortest first: little padding
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    assert [len(b) for b in length_batches([10] * 5, 25)] == [2, 2, 1]


def test_length_batches_bound_the_padding():
    lengths = [10, 10, 11, 12, 20, 21, 40]
    batches = length_batches(lengths, 1000, max_padding=0.25)
    assert [[lengths[i] for i in b] for b in batches] == [[10, 10, 11, 12], [20, 21], [40]]
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1.25 * sum(lengths[i] for i in b)
    assert len(length_batches(lengths, 1000)) == 1   # no bound: one batch within the budget


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("unreadable", "not valid JSON"), ("column", "no prompt column 'question'"),
    ("model", "could not be loaded"), ("format", "unknown format '.csv'"), ("outdir", "does not exist"),
])
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, data, tiny_qwen2_dir, capsys, case, match):
    out = tmp_path / "scored.jsonl"
    args = {"--model": str(tiny_qwen2_dir), "--data": str(data), "--output": str(out)}
    if case == "missing":
        args["--data"] = str(tmp_path / "nope.jsonl")
    elif case == "unreadable":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
        args["--data"] = str(tmp_path / "bad.jsonl")
    elif case == "column":
        args["--prompt-column"] = "question"
    elif case == "model":
        (tmp_path / "notamodel").mkdir()
        (tmp_path / "notamodel" / "config.json").write_text('{"model_type": "nosuchmodel"}')
        args["--model"] = str(tmp_path / "notamodel")
    elif case == "format":
        args["--output"] = str(tmp_path / "scored.csv")
    elif case == "outdir":
        args["--output"] = str(tmp_path / "no" / "scored.jsonl")
    rc = main([x for kv in args.items() for x in kv] + ["--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["prompts.jsonl"] + {"unreadable": ["bad.jsonl"], "model": ["notamodel"]}.get(case, []))
