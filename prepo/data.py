"""Training and evaluation data from files: JSON lines, JSON, parquet, or a directory written by
``datasets``' ``save_to_disk``, in the layouts RL trainers use, read as they are.

* verl: ``prompt`` is a chat (a list of ``{"role", "content"}`` messages), the answer is
  ``reward_model.ground_truth``, and ``data_source`` / ``extra_info`` ride along.
* TRL: a prompt column (text or chat) and any other columns, all handed to the reward function.

The answer column may be a dotted path into nested records (``reward_model.ground_truth``). With the
default ``answer_column="answer"``, rows that have no ``answer`` but a ``reward_model.ground_truth``
use that (the verl layout needs no flag).

A row is skipped, and counted by reason, when its prompt or answer is missing (absent or null),
empty (blank text, an empty chat) or of the wrong type. Numbers (int or float, not bool) are
accepted as answers in their ``str`` form (``42`` -> ``"42"``): datasets often store integer
answers as numbers. Lists and dicts are not answers. A chat prompt must be a non-empty list of
messages whose ``role`` and ``content`` are strings. A file with no usable row, a missing file, an
unknown format or a missing column raises :class:`~prepo.tasks.DataError` naming the file.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import DataError
from .tasks import Problem, Prompt, prompt_key

log = logging.getLogger(__name__)

VERL_ANSWER = "reward_model.ground_truth"
# Integer columns read as a problem's difficulty (per-level accuracy), first found wins:
# "level" is MATH / MATH-500's 1..5.
DIFFICULTY_COLUMNS = ("difficulty", "level")
_MISSING = object()


@dataclass
class LoadedData:
    """Usable rows of a data file and what was skipped (``skipped_reasons``: reason -> rows)."""

    examples: list[Problem]
    skipped: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    source: str = ""
    duplicate_prompts: int = 0  # usable rows whose prompt an earlier row already had (kept)

    def summary(self) -> dict:
        """The numbers a run records (summary.json)."""
        return {"source": self.source, "examples": len(self.examples), "skipped": self.skipped,
                "skipped_reasons": dict(self.skipped_reasons), "duplicate_prompts": self.duplicate_prompts}


def load_examples(path: str | Path, *, prompt_column: str = "prompt", answer_column: str = "answer",
                  split_name: str = "train") -> LoadedData:
    """Problems from ``path`` (``.jsonl``, ``.json``, ``.parquet``, or a ``save_to_disk`` directory;
    for a saved ``DatasetDict``, split ``split_name``, or its only split)."""
    path = Path(path)
    rows = read_rows(path, split_name)
    answer_column = check_columns(path, rows, prompt_column, answer_column)
    examples, reasons = [], Counter()
    for row in rows:
        prompt, answer, why_not = usable_row(row, prompt_column, answer_column)
        if why_not is not None:
            reasons[why_not] += 1
            continue
        others = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        examples.append(Problem(prompt=prompt, answer=answer, difficulty=_difficulty(row), columns=others))
    columns = sorted({k for row in rows for k in row})
    skipped = sum(reasons.values())
    if not examples:
        raise DataError(f"{path}: no usable row among {len(rows)} (prompt column {prompt_column!r}, answer "
                        f"column {answer_column!r}; columns found: {columns}; skipped: {dict(reasons)})")
    if skipped:
        log.warning("%s: skipped %d of %d rows: %s", path, skipped, len(rows), dict(reasons))
    duplicates = len(examples) - len({prompt_key(e.prompt) for e in examples})
    if duplicates:
        log.warning("%s: %d rows repeat an earlier row's prompt (kept as they are)", path, duplicates)
    log.info("%s: %d examples (prompt %r, answer %r)", path, len(examples), prompt_column, answer_column)
    return LoadedData(examples=examples, skipped=skipped, skipped_reasons=dict(reasons), source=str(path),
                      duplicate_prompts=duplicates)


def check_columns(path: Path, rows: Sequence[dict], prompt_column: str, answer_column: str) -> str:
    """The answer column to read (verl's ``reward_model.ground_truth`` when the default finds
    none); :class:`DataError` naming the file when the prompt or answer column is absent."""
    columns = sorted({k for row in rows for k in row})
    if prompt_column not in columns:
        raise DataError(f"{path}: no prompt column {prompt_column!r}; columns found: {columns}")
    answer_column = _answer_column(answer_column, rows)
    if answer_column.split(".")[0] not in columns:
        raise DataError(f"{path}: no answer column {answer_column!r}; columns found: {columns}")
    return answer_column


def usable_row(row: dict, prompt_column: str, answer_column: str) -> tuple[Optional[Prompt], Optional[str], Optional[str]]:
    """(prompt, answer, None) of a usable row, else (None, None, the reason it is skipped)."""
    prompt, why_not = _prompt(row.get(prompt_column, _MISSING))
    if why_not is not None:
        return None, None, why_not
    answer, why_not = _answer(_lookup(row, answer_column))
    return (prompt, answer, None) if why_not is None else (None, None, why_not)


def read_rows(path: Path, split_name: str = "train") -> list[dict]:
    """The rows of a data file as dicts, by format (from the path)."""
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path, split_name)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .parquet or a "
                    "directory written by datasets' save_to_disk")


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def _read_json(path: Path) -> list[dict]:
    """A list of objects, or an object holding one (``{"data": [...]}``); JSON lines also pass."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError:
        return _read_json_lines(path)
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON object must hold exactly one list of rows, found keys {sorted(obj)}")
        obj = lists[0]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of objects")
    return obj


def _read_saved_dataset(path: Path, split_name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: a directory must be one written by datasets' save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split_name in ds:
            ds = ds[split_name]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"{path}: no split {split_name!r}; splits found: {splits}")
    return ds.to_list()


def _answer_column(answer_column: str, rows: Sequence[dict]) -> str:
    """``answer_column``, or verl's ``reward_model.ground_truth`` when the default finds nothing."""
    if answer_column == "answer" and not any("answer" in r for r in rows) \
            and any(_lookup(r, VERL_ANSWER) is not _MISSING for r in rows):
        return VERL_ANSWER
    return answer_column


def _lookup(row: dict, dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"`` (a flat key holding the dots wins); ``_MISSING`` if absent."""
    if dotted in row:
        return row[dotted]
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _prompt(value: Any) -> tuple[Optional[Prompt], Optional[str]]:
    """(prompt, None) or (None, reason it cannot be used)."""
    if value is _MISSING or value is None:
        return None, "missing prompt"
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "empty prompt")
    if isinstance(value, (list, tuple)):
        if not value:
            return None, "empty prompt"
        ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                 for m in value)
        if not ok:
            return None, "malformed chat prompt"
        if not any(m["content"].strip() for m in value):
            return None, "empty prompt"
        return [{"role": m["role"], "content": m["content"]} for m in value], None
    return None, "non-string prompt"


def _answer(value: Any) -> tuple[Optional[str], Optional[str]]:
    if value is _MISSING or value is None:
        return None, "missing answer"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (str(value), None) if math.isfinite(value) else (None, "non-string answer")
    if not isinstance(value, str):
        return None, "non-string answer"
    return (value, None) if value.strip() else (None, "empty answer")


def _difficulty(row: dict) -> Optional[int]:
    for key in DIFFICULTY_COLUMNS:
        v = row.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def reward_columns(problems: Sequence[Problem]) -> dict[str, list]:
    """Keyword lists for a TRL-style reward function: ``answer`` plus every other column of the
    rows (None where a row lacks it). ``answer`` is always the resolved gold answer."""
    keys = sorted({k for p in problems for k in p.columns} - {"answer"})
    out = {k: [p.columns.get(k) for p in problems] for k in keys}
    out["answer"] = [p.answer for p in problems]
    return out
