"""Every option of TrainConfig: a wrong type and every invalid value is a ConfigError naming the
option, raised at load (before any data or model), and every option is read by the trainer."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from prepo.config import FIELDS, ConfigError, _TYPES, from_dict, parse_args

REPO = Path(__file__).resolve().parents[1]

WRONG_TYPE = {bool: ("maybe", "expects a boolean"), int: ("three", "expects an integer"),
              float: ("fast", "expects a number"), str: (["a"], "expects a string"),
              tuple: ("a,b", "expects a comma-separated list of numbers")}

# option -> an invalid value (of the right type)
INVALID = {
    "strategy": "gresso", "total_steps": 0, "num_threads": 0, "device": "gpu0", "dtype": "fp8", "task": "sudoku",
    "eval_data": "e.jsonl", "train_size": 0, "eval_per_level": 0, "heldout_frac": 1.0, "prompt_column": "",
    "answer_column": "", "reward": "no_colon", "warmup_hidden_size": 30, "warmup_num_layers": 0,
    "warmup_num_heads": 0, "warmup_num_kv_heads": 3, "warmup_intermediate_size": 0, "warmup_level_weights": "1,2",
    "warmup_steps": -1, "warmup_batch_size": 0, "warmup_lr": 0.0, "warmup_prompt_loss_weight": -1.0,
    "warmup_slip_rate": 1.0, "candidate_batch_size": 0, "select_ratio": 1.5, "pacing": "cubic",
    "dynamic_max_rounds": 0, "rollout_engine": "sglang", "vllm_gpu_memory_utilization": 1.5,
    "vllm_cpu_kv_cache_gib": 0.0, "vllm_execution": "fast", "group_size": 1,
    "max_new_tokens": 0, "temperature": 0.0, "top_p": 0.0, "lr": 0.0, "weight_decay": -0.1, "max_grad_norm": 0.0,
    "eps_low": 1.0, "eps_high": -0.1, "adv_eps": 0.0, "kl_beta": -1.0, "mini_batches": 0, "ppo_epochs": 0,
    "max_tokens_per_microbatch": 0, "kernel_impl": "fast", "eval_every": -1, "eval_avg_k": -1,
    "spearman_prompts": -1, "spearman_samples": 0, "save_every": -1, "ppl_scope": "system",
    "curriculum_direction": "up", "premise_probes": -1, "premise_window_steps": 0,
}
# options whose every value of the right type is valid (paths and texts checked when used, seeds, switches)
FREE = {"seed", "output_dir", "resume", "gradient_checkpointing", "progress", "tensorboard", "train_data",
        "eval_prompt_column", "eval_answer_column", "chat_template", "system_prompt", "instruction_suffix",
        "model", "cache_dir", "warmup_seed"}


def test_the_tables_cover_every_option():
    assert set(INVALID) | FREE == set(FIELDS) and not set(INVALID) & FREE


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_wrong_type_names_the_option(key):
    value, msg = WRONG_TYPE[_TYPES[key]]
    with pytest.raises(ConfigError, match=f"{key} {msg}"):
        from_dict({key: value})


@pytest.mark.parametrize("key", sorted(INVALID))
def test_invalid_value_names_the_option(key):
    short = key.removeprefix("warmup_")
    with pytest.raises(ConfigError, match=re.escape(short)):
        from_dict({key: INVALID[key]})


def test_what_the_options_need_of_the_machine(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda' was asked for but CUDA is not available"):
            from_dict({"device": "cuda"})
        with pytest.raises(ConfigError, match="kernel_impl 'cuda' is not available on cpu"):
            from_dict({"kernel_impl": "cuda"})
    with pytest.raises(ConfigError, match="--rollout-engine vllm"):
        from_dict({"rollout_engine": "vllm"})   # no vLLM in this environment
    monkeypatch.setenv("WORLD_SIZE", "2")      # as under torchrun
    for strategy in ("greso", "dapo_dynamic"):
        with pytest.raises(ConfigError, match=f"{strategy} runs in one process only"):
            from_dict({"strategy": strategy})
    with pytest.raises(ConfigError, match="1 selected prompts cannot be shared by 2 processes"):
        from_dict({"candidate_batch_size": 4, "select_ratio": 0.25})
    assert from_dict({"strategy": "random"}).strategy == "random"


def test_warmup_records_the_runs_task():
    cfg = parse_args(["--task", "countdown", "--heldout-frac", "0.2"])
    assert (cfg.warmup.task, cfg.warmup.heldout_frac) == ("countdown", 0.2)
    assert cfg.to_dict()["warmup"]["task"] == "countdown"          # what config.yaml records


def test_every_option_is_read():
    """Each option is read outside config.py (select_ratio through the property num_selected)."""
    code = "\n".join(p.read_text() for p in (REPO / "prepo").rglob("*.py") if p.name != "config.py")
    unread = [k for k, (owner, attr) in FIELDS.items() if not re.search(rf"\.{attr}\b", code)]
    assert unread == ["select_ratio"] and re.search(r"\.num_selected\b", code), unread
