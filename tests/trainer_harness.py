"""Shared helpers of the trainer's end-to-end tests: the tiny config, the command line, the
environment and the metrics a run writes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a tiny warm-up and a few short steps: a run takes seconds
TINY = {
    "warmup_steps": 40, "warmup_hidden_size": 32, "warmup_num_layers": 1,
    "warmup_batch_size": 32, "train_size": 200, "eval_per_level": 4, "candidate_batch_size": 10,
    "group_size": 4, "max_new_tokens": 4, "spearman_prompts": 12, "spearman_samples": 4,
    "num_threads": 1, "eval_every": 3, "save_every": 2, "progress": False,
}


def args(cfg: dict) -> list[str]:
    """``cfg`` as ``--key value`` command-line arguments."""
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def env() -> dict:
    """The environment of a trainer subprocess: this checkout first on the path, one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def cmd(cfg: dict) -> list[str]:
    return [sys.executable, "-m", "prepo.train", *args(cfg)]


def metrics(out_dir: Path, drop: tuple = ("time_",)) -> list[dict]:
    """metrics.jsonl's rows without the fields whose names start with one of ``drop``."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]
