"""``python -m prepo.train [--config file.yaml] [--key value ...]``: parse, run, print the outcome.
A user error (:class:`~prepo.errors.UserError`: an option, the data, the reward, the model, the
output directory) exits with status 2 and a one-line message. :mod:`prepo.train` calls :func:`main`
with its ``run``; this module imports nothing of the trainer (one direction).

Also the ``prepo`` console script (:func:`prepo_main`): ``prepo <command> [args]`` runs exactly what
``python -m <module> [args]`` runs, for each command of :data:`COMMANDS`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import runpy
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
    # sampled first: it is what RL optimizes here; greedy says whether the model's best answer held
    if summary["initial_avg_k"] is not None:
        print(f"held-out avg@{summary['avg_k']} (sampled): initial {summary['initial_avg_k']:.3f} -> "
              f"final {summary['final_avg_k']:.3f}   (accuracy of {summary['avg_k']} samples per problem at the "
              "training temperature: what RL optimizes)")
    if summary["initial_accuracy"] is not None:
        print(f"held-out greedy accuracy: initial {summary['initial_accuracy']:.3f} -> final "
              f"{summary['final_accuracy']:.3f}   (the single most likely answer per problem)")
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


# ``prepo <name>`` -> (what it runs, one line of help). A module runs as ``python -m`` runs it; a path
# is a script of the source checkout that holds this package (benchmarks/ is not installed).
COMMANDS = {
    "train": ("prepo.train", "train a policy with PREPO or a baseline strategy (python -m prepo.train)"),
    "score": ("prepo.score", "score prompts by the policy's perplexity (python -m prepo.score)"),
    "bench": ("benchmarks/bench_logprob_entropy.py",
              "the kernel benchmark (python benchmarks/bench_logprob_entropy.py; needs a source checkout)"),
}
CHECKOUT = Path(__file__).resolve().parent.parent


def _runnable(target: str) -> bool:
    if target.endswith(".py"):
        return (CHECKOUT / target).is_file()
    return importlib.util.find_spec(target) is not None


def commands_help() -> str:
    lines = ["usage: prepo <command> [arguments]   (prepo <command> --help: the command's own help)", "",
             "commands:"]
    for name, (target, text) in COMMANDS.items():
        if _runnable(target):
            lines.append(f"  {name:8s} {text}")
    return "\n".join(lines)


def prepo_main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``prepo`` console script: ``prepo <command> [args]``; the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(commands_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or not _runnable(COMMANDS[name][0]):
        why = "needs a source checkout of prepo" if name in COMMANDS else "is not a prepo command"
        print(f"error: {name!r} {why}\n\n{commands_help()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    saved, sys.argv = sys.argv, [f"prepo {name}"] + rest
    try:
        if target.endswith(".py"):
            runpy.run_path(str(CHECKOUT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:   # python -m's exit: a status, None, or a message (status 1)
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
