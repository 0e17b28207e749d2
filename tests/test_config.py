"""Every option of TrainConfig: a wrong type and every invalid value is a ConfigError naming the
option, raised at load; what the options need of the machine is checked by the preflight (before
any data or model); and every option is read by the trainer."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from prepo import vllm_engine
from prepo.config import FIELDS, _TYPES, TrainConfig, from_dict, parse_args
from prepo.errors import ConfigError
from prepo.preflight import preflight

REPO = Path(__file__).resolve().parents[1]

WRONG_TYPE = {bool: ("maybe", "expects a boolean"), int: ("three", "expects an integer"),
              float: ("fast", "expects a number"), str: (["a"], "expects a string"),
              tuple: ("a,b", "expects a comma-separated list of numbers")}

# option -> an invalid value (of the right type)
INVALID = {
    "strategy": "gresso", "total_steps": 0, "num_threads": 0, "device": "gpu0", "dtype": "fp8", "task": "sudoku",
    "eval_data": "e.jsonl", "train_size": 0, "eval_per_level": 0, "eval_min_level": 5, "heldout_frac": 1.0, "prompt_column": "",
    "answer_column": "", "reward": "no_colon", "warmup_hidden_size": 30, "warmup_num_layers": 0,
    "warmup_num_heads": 0, "warmup_num_kv_heads": 3, "warmup_intermediate_size": 0, "warmup_level_weights": "1,2",
    "warmup_steps": -1, "warmup_batch_size": 0, "warmup_lr": 0.0, "warmup_prompt_loss_weight": -1.0,
    "warmup_slip_rate": 1.0, "candidate_batch_size": 0, "select_ratio": 1.5, "pacing": "cubic",
    "dynamic_max_rounds": 0, "rollout_engine": "sglang", "vllm_gpu_memory_utilization": 1.5,
    "vllm_cpu_kv_cache_gib": 0.0, "vllm_execution": "fast", "vllm_check_every": -1, "vllm_check_tol": -1.0,
    "group_size": 1,
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
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda' was asked for but CUDA is not available"):
            preflight(from_dict({"device": "cuda"}))
        with pytest.raises(ConfigError, match="kernel_impl 'cuda' is not available on cpu"):
            preflight(from_dict({"kernel_impl": "cuda"}))
    assert preflight(from_dict({})) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")      # as under torchrun
    for strategy in ("greso", "dapo_dynamic"):
        with pytest.raises(ConfigError, match=f"{strategy} runs in one process only"):
            preflight(from_dict({"strategy": strategy}))
    with pytest.raises(ConfigError, match="1 selected prompts cannot be shared by 2 processes"):
        preflight(from_dict({"candidate_batch_size": 4, "select_ratio": 0.25}))
    assert preflight(from_dict({"strategy": "random"})) == torch.device("cpu")


def _no_vllm():
    raise ImportError("--rollout-engine vllm needs vLLM: pip install it (import failed: no module named vllm)")


@pytest.mark.parametrize("installed", [False, True])
def test_the_vllm_engine_needs_vllm_installed(monkeypatch, installed):
    """Whether or not vLLM is installed here: the preflight stops a vLLM run when the import fails
    and lets it through when it works; only one process may run the engine."""
    monkeypatch.setattr(vllm_engine, "require_vllm", (lambda: None) if installed else _no_vllm)
    cfg = from_dict({"rollout_engine": "vllm"})
    if installed:
        assert preflight(cfg) == torch.device("cpu")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="--rollout-engine vllm runs in one process only"):
            preflight(cfg)
    else:
        with pytest.raises(ConfigError, match="--rollout-engine vllm needs vLLM"):
            preflight(cfg)


def test_defaults_are_valid():
    cfg = TrainConfig().validate()
    assert cfg.num_selected == 13 and cfg.strategy == "prepo"


def test_overrides_in_order(tmp_path):
    """Defaults, then the YAML file, then the command line (which wins), in every spelling."""
    y = tmp_path / "c.yaml"
    y.write_text("strategy: random\ntotal_steps: 7\nlr: 1.0e-4\n")
    cfg = parse_args(["--config", str(y), "--total-steps", "9", "--seed=4", "--resume", "--output_dir", "o"])
    assert (cfg.strategy, cfg.total_steps, cfg.seed, cfg.resume, cfg.output_dir, cfg.lr) == ("random", 9, 4, True, "o", 1e-4)
    assert from_dict({"group-size": 4}).group_size == 4


def test_parsing_errors_name_the_problem(tmp_path):
    """What the option tables above do not reach: misspelt keys (listing the valid ones), a YAML
    file that is not a mapping, a key without its value."""
    with pytest.raises(ConfigError, match="unknown config key 'total-stepz'; valid keys:.*total_steps"):
        parse_args(["--total-stepz", "3"])
    y = tmp_path / "bad.yaml"
    y.write_text("stratgy: prepo\n")
    with pytest.raises(ConfigError, match="unknown config key 'stratgy'"):
        parse_args(["--config", str(y)])
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args(["--config", str(y)])
    with pytest.raises(ConfigError, match="--seed needs a value"):
        parse_args(["--seed"])


def test_warmup_records_the_runs_task():
    cfg = parse_args(["--task", "countdown", "--heldout-frac", "0.2"])
    assert (cfg.warmup.task, cfg.warmup.heldout_frac) == ("countdown", 0.2)
    assert cfg.to_dict()["warmup"]["task"] == "countdown"          # what config.yaml records


def _unread(code: str) -> list[str]:
    """The options that ``code`` never reads as ``cfg.<option>`` (``cfg.warmup.<field>``, or a
    WarmupConfig's ``cfg.<field>``; ``self.cfg.<option>`` included): the trainer's name for
    its configuration, so that ``random.seed`` or ``args.lr`` do not count."""
    return [k for k, (owner, attr) in FIELDS.items() if not re.search(rf"\bcfg\.(?:warmup\.)?{attr}\b", code)]


def test_every_option_is_read():
    """Each option is read outside config.py (select_ratio through the property num_selected)."""
    code = "\n".join(p.read_text() for p in (REPO / "prepo").rglob("*.py") if p.name != "config.py")
    assert _unread(code) == ["select_ratio"] and re.search(r"\bcfg\.num_selected\b", code), _unread(code)


def test_the_read_check_can_fail():
    """An option read only under another name, or only in a comment's ``.seed``, is unread."""
    assert "seed" in _unread("random.seed(0)\nargs.seed\nconfig_seed = 1")
    assert "lr" in _unread("opt = AdamW(lr=args.lr)")
    assert "lr" not in _unread("opt = AdamW(lr=self.cfg.lr)")
    assert "warmup_steps" not in _unread("for s in range(cfg.steps): pass")
