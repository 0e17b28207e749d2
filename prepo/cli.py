"""``python -m prepo.train [--config file.yaml] [--key value ...]``: parse, run, print the outcome.
A user error (:class:`~prepo.errors.UserError`: an option, the data, the reward, the model, the
output directory) exits with status 2 and a one-line message. :mod:`prepo.train`
calls :func:`main` with its ``run``; this module imports nothing of the trainer (one direction)."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import parse_args
from .errors import UserError


def _quiet_libraries() -> None:
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars
    except ImportError:
        pass


def print_outcome(summary: dict, wall: float) -> None:
    print(f"strategy {summary['strategy']}, {summary['steps']} steps, {summary['rollouts']} rollouts, wall {wall:.0f}s")
    for split, info in summary["data"].items():
        print(f"{split} data {info['source']}: {info['examples']} rows used, {info['skipped']} skipped "
              f"{info['skipped_reasons'] or ''}")
    if summary["spearman_ppl_passrate"] is not None:
        print(f"Spearman(prompt perplexity, pass rate) of the base policy: {summary['spearman_ppl_passrate']:.3f}")
    if summary["initial_accuracy"] is not None:
        print(f"held-out greedy accuracy: initial {summary['initial_accuracy']:.3f} -> final {summary['final_accuracy']:.3f}")
    if summary["initial_avg_k"] is not None:
        print(f"held-out avg@{summary['avg_k']} (sampled): initial {summary['initial_avg_k']:.3f} -> "
              f"final {summary['final_avg_k']:.3f}")
    fr = summary["time_split_frac"]
    print("step time split: " + ", ".join(f"{k[5:]} {100 * v:.1f}%" for k, v in fr.items())
          + f"; PREPO overhead (scoring, selection, weighting) {100 * summary['prepo_overhead_frac']:.2f}%")
    plot = Path(summary["plot"]).name if summary["plot"] else "no plot"
    print(f"results in {summary['output_dir']} (metrics.jsonl, eval.jsonl, summary.json, {plot})")


def main(run: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), ``run(config)``, print the outcome; the exit status."""
    rank = int(os.environ.get("RANK", "0"))   # torchrun: the other ranks log warnings only
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    t0 = time.perf_counter()
    try:
        summary = run(parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print_outcome(summary, time.perf_counter() - t0)
    return 0
