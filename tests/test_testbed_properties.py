"""benchmarks/testbed_properties.py on a tiny Countdown base model (a few warm-up steps)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import testbed_properties as tp  # noqa: E402


@pytest.mark.slow
def test_measure_and_render_a_tiny_testbed(tmp_path):
    train = {"task": "countdown", "warmup_steps": 5, "warmup_batch_size": 8, "train_size": 40, "eval_per_level": 2,
             "max_new_tokens": 12, "eval_avg_k": 2, "candidate_batch_size": 10, "group_size": 2,
             "cache_dir": str(tmp_path / "cache"), "num_threads": 1}
    props = tp.measure(train, seed=0, batches=2, spearman=(8, 2))
    assert props["n_prompts"] == 8 and props["samples"] == 2 and sum(props["pass_rate_hist"]) == 8
    assert props["batches"] == 2 and props["rollouts_per_batch"] == 2 * 2
    assert props["w_pooled_p10"] <= props["w_pooled_p50"] <= props["w_pooled_p90"]
    assert props["n_correct"] + props["n_wrong"] == 2 * 2 * 2
    assert set(props["in_regime"]) == {"spearman", "pass_rate_spread", "weights"}
    assert set(props["by_scope"]) == {"problem", "user", "prompt"}   # no template: the scopes agree
    np.testing.assert_equal(props["by_scope"]["problem"], props["by_scope"]["prompt"])   # nan == nan here
    np.testing.assert_equal(props["by_scope"]["problem"]["spearman"], props["spearman_ppl_passrate"])
    assert sum(n for _, n in props["pass_rate_by_level"].values()) == 8
    md = tp.render("tiny", props, "cmd")
    assert "Spearman(prompt ppl, pass rate)" in md and "w_i per batch" in md
    assert "ppl_scope problem: Spearman / partial given log words" in md and "pass rate per level" in md


def test_in_regime_reads_the_issue_targets():
    props = {"spearman_ppl_passrate": -0.2, "pass_rate_hist": [3, 2, 2, 2, 1], "w_batch_p10_mean": 0.7,
             "w_batch_p90_mean": 1.5}
    assert tp.in_regime(props) == {"spearman": True, "pass_rate_spread": True, "weights": True}
    props.update(spearman_ppl_passrate=-0.64, pass_rate_hist=[6, 1, 1, 1, 1], w_batch_p10_mean=0.35)
    assert tp.in_regime(props) == {"spearman": False, "pass_rate_spread": False, "weights": False}


def test_weight_by_correctness_means_and_test():
    w = np.array([1.5, 1.4, 1.6, 0.5, 0.6, 0.4, 0.5])
    correct = np.array([True, True, True, False, False, False, False])
    got = tp.weight_by_correctness(w, correct)
    assert got["w_mean_correct"] == pytest.approx(1.5) and got["w_mean_wrong"] == pytest.approx(0.5)
    assert (got["n_correct"], got["n_wrong"]) == (3, 4) and got["w_correct_vs_wrong_pvalue"] < 0.06
    none_right = tp.weight_by_correctness(w, np.zeros(7, dtype=bool))
    assert np.isnan(none_right["w_mean_correct"]) and np.isnan(none_right["w_correct_vs_wrong_pvalue"])
