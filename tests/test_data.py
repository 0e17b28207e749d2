"""prepo.data: the file formats, the verl and TRL layouts, skipped rows and the errors."""
from __future__ import annotations

import json

import pytest

from prepo.data import LoadedData, load_examples, reward_columns
from prepo.errors import DataError
from prepo.tasks import Problem

# One row of each public layout the README documents (texts shortened).
DAPO_ROW = {  # BytedTsinghua-SIA/DAPO-Math-17k (verl parquet)
    "data_source": "math_dapo",
    "prompt": [{"content": "Solve the following math problem step by step. ... What is 2+2?\n\n"
                           "Remember to put your answer on its own line after \"Answer:\".", "role": "user"}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "4", "style": "rule-lean"},
    "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
}
MATH500_ROW = {  # HuggingFaceH4/MATH-500 (test.jsonl)
    "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
    "solution": "... we get $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
    "subject": "Precalculus",
    "level": 2,
    "unique_id": "test/precalculus/807.json",
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_read_as_is(tmp_path):
    rows = [DAPO_ROW, {**DAPO_ROW, "reward_model": {"ground_truth": "", "style": "rule"}}, DAPO_ROW]
    data = load_examples(write_parquet(tmp_path / "dapo.parquet", rows))
    assert isinstance(data, LoadedData) and data.source.endswith("dapo.parquet")
    ex, again = data.examples
    assert ex.prompt == DAPO_ROW["prompt"] and ex.answer == "4" and ex.difficulty is None
    assert again == ex and data.duplicate_prompts == 1  # counted, kept
    assert ex.columns["data_source"] == "math_dapo"
    assert ex.columns["extra_info"] == DAPO_ROW["extra_info"]
    assert (data.skipped, data.skipped_reasons) == (1, {"empty answer": 1})
    assert data.summary() == {"source": data.source, "examples": 2, "skipped": 1,
                              "skipped_reasons": {"empty answer": 1}, "duplicate_prompts": 1}
    explicit = load_examples(tmp_path / "dapo.parquet", answer_column="reward_model.ground_truth")
    assert explicit.examples == data.examples


def test_math500_jsonl_with_prompt_column(tmp_path):
    data = load_examples(write_jsonl(tmp_path / "test.jsonl", [MATH500_ROW]), prompt_column="problem")
    (ex,) = data.examples
    assert ex.prompt == MATH500_ROW["problem"] and ex.answer == MATH500_ROW["answer"]
    assert ex.difficulty == 2  # MATH's level
    assert set(ex.columns) == {"solution", "subject", "level", "unique_id"}
    with pytest.raises(DataError, match=r"no prompt column 'prompt'.*'problem'"):
        load_examples(tmp_path / "test.jsonl")
    with pytest.raises(DataError, match=r"no answer column 'final'"):
        load_examples(tmp_path / "test.jsonl", prompt_column="problem", answer_column="final")


def test_skipped_rows_are_counted_by_reason(tmp_path):
    rows = [
        {"prompt": "1+1=", "answer": "2", "difficulty": 0, "source": "a"},
        {"prompt": "2+2=", "answer": 4},                 # numbers are answers, as text
        {"prompt": "x?", "answer": 0.5},
        {"answer": "1"},                                 # missing prompt
        {"prompt": None, "answer": "1"},                 # missing prompt
        {"prompt": "   ", "answer": "1"},                # empty prompt
        {"prompt": 7, "answer": "1"},                    # non-string prompt
        {"prompt": [], "answer": "1"},                   # empty chat
        {"prompt": [{"role": "user"}], "answer": "1"},   # malformed chat
        {"prompt": "3+3="},                              # missing answer
        {"prompt": "3+3=", "answer": ""},                # empty answer
        {"prompt": "3+3=", "answer": ["6"]},             # non-string answer
        {"prompt": "3+3=", "answer": {"v": 6}},          # non-string answer
        {"prompt": "3+3=", "answer": True},              # non-string answer
    ]
    data = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(e.prompt, e.answer, e.difficulty) for e in data.examples] == [
        ("1+1=", "2", 0), ("2+2=", "4", None), ("x?", "0.5", None)]
    assert data.examples[0].columns == {"difficulty": 0, "source": "a"}
    assert data.skipped == 11
    assert data.skipped_reasons == {"missing prompt": 2, "empty prompt": 2, "non-string prompt": 1,
                                    "malformed chat prompt": 1, "missing answer": 1, "empty answer": 1,
                                    "non-string answer": 3}


def test_no_usable_row_is_an_error_naming_file_columns_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": None}, {"prompt": "", "answer": "1"}])
    with pytest.raises(DataError) as err:
        load_examples(path)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "['answer', 'prompt']" in msg
    assert "'missing answer': 1" in msg and "'empty prompt': 1" in msg


def test_json_formats(tmp_path):
    rows = [{"prompt": "p1", "answer": "1"}, {"prompt": "p2", "answer": "2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": "1", "data": rows}))
    write_jsonl(tmp_path / "lines.json", rows)
    for name in ("list.json", "wrapped.json", "lines.json"):
        assert [e.prompt for e in load_examples(tmp_path / name).examples] == ["p1", "p2"]
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(DataError, match="list of objects"):
        load_examples(tmp_path / "scalar.json")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"prompt": "p1", "answer": "1"}])
    test = datasets.Dataset.from_list([{"prompt": "q1", "answer": "2"}, {"prompt": "q2", "answer": "3"}])
    train.save_to_disk(str(tmp_path / "one"))
    assert load_examples(tmp_path / "one").examples[0].prompt == "p1"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    assert len(load_examples(tmp_path / "both").examples) == 1
    assert len(load_examples(tmp_path / "both", split_name="test").examples) == 2
    with pytest.raises(DataError, match=r"no split 'eval'; splits found: \['train', 'test'\]"):
        load_examples(tmp_path / "both", split_name="eval")
    datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "only_test"))
    assert len(load_examples(tmp_path / "only_test", split_name="eval").examples) == 2
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_examples(tmp_path / "plain_dir")


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_examples(tmp_path / "broken.jsonl")
    (tmp_path / "array.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match="expected a JSON object"):
        load_examples(tmp_path / "array.jsonl")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_examples(tmp_path / "bad.parquet")


def test_reward_columns_are_keyword_lists():
    probs = [Problem("a", "1", columns={"data_source": "x", "extra_info": {"i": 0}}),
             Problem("b", "2", columns={"data_source": "y", "answer": "stale"})]
    cols = reward_columns(probs)
    assert cols == {"answer": ["1", "2"], "data_source": ["x", "y"], "extra_info": [{"i": 0}, None]}
