"""The step-time split of finished ``python -m prepo.train`` runs, side by side: each phase's share
of the summed step time, its median seconds per step, the mean zero-advantage fraction and the
share of rollouts the update skipped.

    python benchmarks/step_time_split.py runs/before runs/after     # directories holding metrics.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prepo.metrics import TIME_KEYS  # noqa: E402


def split(run_dir: Path) -> dict:
    """{phase: (share of step time, median seconds per step)}, plus the run's zero-advantage and skip shares."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total = sum(r["time_step"] for r in rows)
    out = {k: (sum(r.get(k, 0.0) for r in rows) / total, statistics.median(r.get(k, 0.0) for r in rows))
           for k in TIME_KEYS + ("time_step",)}
    out["steps"] = len(rows)
    out["zero_adv_frac"] = statistics.mean(r["zero_adv_frac"] for r in rows)
    kept = sum(r["step_rollouts"] for r in rows)   # static strategies keep every rollout
    out["skipped_frac"] = sum(r.get("skipped_rollouts", 0) for r in rows) / max(kept, 1)
    return out


def table(runs: dict[str, dict]) -> str:
    names = list(runs)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in TIME_KEYS + ("time_step",):
        cells = [f"{100 * runs[n][k][0]:.1f}% ({runs[n][k][1]:.3f} s)" for n in names]
        lines.append(f"| {k[5:]}: share of step time (median s/step) | " + " | ".join(cells) + " |")
    for k, fmt in (("steps", "{}"), ("zero_adv_frac", "{:.3f}"), ("skipped_frac", "{:.3f}")):
        lines.append(f"| {k} | " + " | ".join(fmt.format(runs[n][k]) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    print(table({str(d): split(d) for d in args.runs}))


if __name__ == "__main__":
    main()
