"""The run's per-step files (prepo/report.py): selection.jsonl beside metrics.jsonl, written,
truncated on resume and cleared on a fresh start (no trainer; the trainer's end-to-end tests in
test_prepo_train.py check what a real run writes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from prepo.config import TrainConfig
from prepo.errors import RunDirError
from prepo.metrics import StepMetrics
from prepo.report import RunLog, read_jsonl, selection_row


def test_selection_row_fields_and_rounding():
    row = selection_row(1 / 3, [7, 2], [0, 4], [0.125, 0.987654], ppl=[3.141592, 2.0],
                        cand_ppl=np.arange(1.0, 12.0))
    assert row == {"rho": 0.333333, "prompt_ids": [7, 2], "levels": [0, 4], "ppl": [3.1416, 2.0],
                   "pass_rate": [0.125, 0.9877], "cand_ppl": {"p10": 2.0, "p50": 6.0, "p90": 10.0}}
    assert json.loads(json.dumps(row)) == row   # plain JSON types (no numpy scalars)
    # dynamic sampling (no indices), data without levels, a strategy that does not score prompts
    row = selection_row(0.5, None, [None, None], [1.0])
    assert row["prompt_ids"] is None and row["levels"] is None and row["ppl"] is None and row["cand_ppl"] is None


def _step(k: int, picked: dict | None) -> StepMetrics:
    return StepMetrics(step=k, rollouts=8 * k, step_rollouts=8, rho=k / 4, weight_applied=True, reward_failures=0,
                       picked=picked)


def test_run_log_writes_selection_rows_and_truncates_them_with_metrics(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, tensorboard=False)
    log = RunLog(tmp_path, cfg)
    log.start_fresh()
    for k in (1, 2, 3):
        log.write_step(_step(k, selection_row(k / 4, [k], [1], [0.5])))
    metrics, picks = read_jsonl(log.metrics_path), read_jsonl(log.selection_path)
    assert [m["step"] for m in metrics] == [p["step"] for p in picks] == [1, 2, 3]
    assert "picked" not in metrics[0] and "prompt_ids" not in metrics[0]   # metrics.jsonl stays as it was
    assert StepMetrics.from_dict(metrics[0]).picked is None
    log.truncate(2, 0)   # back to a checkpoint taken after step 2
    assert [p["step"] for p in read_jsonl(log.selection_path)] == [1, 2]
    log.write_step(_step(3, selection_row(0.75, [3], [1], [0.5])))
    assert [p["step"] for p in read_jsonl(log.selection_path)] == [1, 2, 3]   # no duplicate step
    log.start_fresh()
    assert not log.selection_path.exists()


def test_resume_of_a_run_without_selection_log(tmp_path):
    """A checkpoint from before selection.jsonl existed resumes; the file starts at the resumed step."""
    log = RunLog(tmp_path, TrainConfig(output_dir=str(tmp_path), progress=False, tensorboard=False))
    log.metrics_path.write_text('{"step": 1}\n{"step": 2}\n')
    log.truncate(2, 0)
    assert not log.selection_path.exists()
    log.selection_path.write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="expects 2"):   # a shorter file than the checkpoint saw: corrupt
        log.truncate(2, 0)
