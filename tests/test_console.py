"""The `prepo` console script (prepo.cli.prepo_main): each command runs exactly its `python -m` form."""
from __future__ import annotations

import subprocess
import sys

from prepo.cli import COMMANDS, prepo_main


def test_help_lists_the_commands_that_run_here(capsys):
    assert prepo_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train " in out and "bench " in out
    assert ("score " in out) == (__import__("importlib").util.find_spec(COMMANDS["score"][0]) is not None)


def test_no_command_or_an_unknown_one_is_an_error(capsys):
    assert prepo_main([]) == 2
    assert prepo_main(["tran"]) == 2
    assert "'tran' is not a prepo command" in capsys.readouterr().err


def test_train_is_python_m_prepo_train(capsys):
    assert prepo_main(["train", "--help"]) == 0
    ours = capsys.readouterr().out
    theirs = subprocess.run([sys.executable, "-m", "prepo.train", "--help"], capture_output=True, text=True, check=True)
    assert ours == theirs.stdout and "--total-steps" in ours


def test_train_passes_its_arguments_and_exit_status(capsys):
    assert prepo_main(["train", "--total-steps", "0"]) == 2
    assert "total_steps must be >= 1" in capsys.readouterr().err


def test_bench_is_the_kernel_benchmark(capsys):
    assert prepo_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--shapes" in out and "--providers" in out


def test_the_summary_prints_sampled_accuracy_first_and_says_what_each_means(capsys):
    from prepo.cli import print_outcome

    summary = {"strategy": "prepo", "steps": 2, "rollouts": 16, "data": {}, "spearman_ppl_passrate": None,
               "initial_accuracy": 0.5, "final_accuracy": 0.5, "initial_avg_k": 0.25, "final_avg_k": 0.375, "avg_k": 8,
               "time_split_frac": {"time_score": 0.5, "time_update": 0.5}, "prepo_overhead_frac": 0.01,
               "plot": None, "output_dir": "runs/x"}
    print_outcome(summary, 1.0)
    out = capsys.readouterr().out
    sampled, greedy = out.index("held-out avg@8 (sampled): initial 0.250 -> final 0.375"), out.index("held-out greedy")
    assert sampled < greedy and "what RL optimizes" in out and "most likely answer" in out
