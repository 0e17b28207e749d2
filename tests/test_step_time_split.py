"""benchmarks/step_time_split.py on hand-made metrics.jsonl files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import step_time_split as sts  # noqa: E402


def _run(path: Path, updates: list[float], skipped: int) -> Path:
    path.mkdir()
    rows = [{"time_step": 10.0, "time_update": u, "time_generate": 10.0 - u, "zero_adv_frac": 0.5,
             "step_rollouts": 64, "skipped_rollouts": skipped} for u in updates]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_shares_medians_and_skips(tmp_path):
    before = sts.split(_run(tmp_path / "before", [4.0, 6.0, 5.0], 0))
    after = sts.split(_run(tmp_path / "after", [2.0, 3.0, 2.5], 32))
    assert before["time_update"] == pytest.approx((0.5, 5.0)) and after["time_update"] == pytest.approx((0.25, 2.5))
    assert before["time_score"] == (0.0, 0.0) and after["steps"] == 3
    assert (before["skipped_frac"], after["skipped_frac"], after["zero_adv_frac"]) == (0.0, 0.5, 0.5)
    md = sts.table({"before": before, "after": after})
    assert "| update: share of step time (median s/step) | 50.0% (5.000 s) | 25.0% (2.500 s) |" in md
