"""benchmarks/bench_rl_step.py's parts that need neither vLLM nor TRL: the trainer config it runs
(the work it claims: 8 of 40 prompts x 8 rollouts, one optimizer step a batch, on-policy) and its
table's ratios. The benchmark itself runs in the vLLM environment."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_rl_step as b  # noqa: E402

from prepo.config import from_dict  # noqa: E402


def test_prepo_config_is_the_stated_work(tmp_path):
    cfg = from_dict(b.prepo_config(4, tmp_path))
    assert (cfg.num_selected, cfg.candidate_batch_size, cfg.group_size) == (b.PROMPTS, b.CANDIDATES, b.GROUP)
    assert (cfg.mini_batches, cfg.ppo_epochs, cfg.kl_beta, cfg.total_steps) == (1, 1, 0.0, 4)
    assert (cfg.model, cfg.rollout_engine, cfg.temperature, cfg.max_new_tokens) == (
        "smollm2-135m-instruct", "vllm", 0.7, 32)
    assert not cfg.gradient_checkpointing and b.prepo_vllm_dtype({}) == "float32"
    assert b.prepo_vllm_dtype({"dtype": "bf16"}) == "bfloat16"


def test_set_changes_a_trainer_option_and_refuses_others(tmp_path):
    import argparse

    import pytest

    p = argparse.ArgumentParser()
    over = b.parse_sets(["gradient_checkpointing=true", "max_tokens_per_microbatch=2048"], p)
    cfg = from_dict(b.prepo_config(4, tmp_path, over))
    assert cfg.gradient_checkpointing and cfg.max_tokens_per_microbatch == 2048
    for bad in ("no_such_option=1", "gradient_checkpointing"):
        with pytest.raises(SystemExit):
            b.parse_sets([bad], p)


def _result(side: str, step: float, rss: float) -> dict:
    phases = b.PHASES["trl" if side == "trl" else "prepo"]
    med = {"step": step, **{k: step / len(phases) for k in phases}}
    return {"side": side, "median": med, "rollouts_per_s": 64 / step, "peak_rss_gib": rss, "vllm_dtype": "float32"}


def test_table_gives_each_side_its_split_and_ratios_to_trl():
    md = b.table([_result("prepo", 30.0, 6.0), _result("trl", 60.0, 8.0)])
    prepo_row, trl_row = md.splitlines()[2:]
    assert prepo_row.startswith("| prepo | float32 | 30.00 | score 3.75 (12%)") and prepo_row.endswith("| 0.50x | 0.75x |")
    assert "rollout_other 12.00 (20%)" in trl_row and trl_row.endswith("| 1.00x | 1.00x |")
    assert b.table([_result("prepo", 30.0, 6.0)]).endswith("| - | - |")
