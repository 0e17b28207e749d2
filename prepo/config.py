"""The trainer's configuration: one dataclass, filled from defaults, then an optional YAML file
(``--config file.yaml``), then ``--key value`` / ``--key-with-dashes value`` / ``--key=value``
command-line overrides. Unknown keys, values of the wrong type and invalid settings are errors
(:class:`ConfigError`) whose message says what is valid.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

STRATEGIES = ("prepo", "random", "ppl_only", "entropy_only", "static_low_ppl", "dapo_dynamic")
PACINGS = ("linear", "quadratic", "exponential")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what is valid."""


@dataclass
class TrainConfig:
    # --- run ---
    strategy: str = "prepo"          # one of STRATEGIES
    total_steps: int = 200
    seed: int = 0
    output_dir: str = "runs/prepo"
    resume: bool = False             # continue from output_dir/checkpoints/last.pt
    num_threads: int = 1             # torch CPU threads (results depend on it; 1 is as fast for this tiny model and robust on a shared CPU)
    device: str = "cpu"
    progress: bool = True            # tqdm bar
    tensorboard: bool = True         # when installed
    # --- data / task ---
    train_size: int = 2000           # built-in task: training prompts (uniform over levels)
    eval_per_level: int = 40         # built-in task: held-out problems per level
    train_file: str = ""             # optional JSONL of {"prompt", "answer"[, "difficulty"]}
    eval_file: str = ""
    heldout_frac: float = 0.15
    # --- base model (built-in warm-up) ---
    model_dir: str = ""              # use this HF model dir instead of the built-in warm-up
    cache_dir: str = ""              # warm-up cache (default ~/.cache/prepo or $PREPO_CACHE)
    warmup_steps: int = 1500
    warmup_batch_size: int = 64
    warmup_hidden_size: int = 96
    warmup_layers: int = 3
    warmup_slip_rate: float = 0.1    # corpus noise: probability that a worked-solution step is off by 1..3
    # --- selection (PREPO curriculum) ---
    candidate_batch_size: int = 64   # |B|
    select_ratio: float = 0.2        # K / |B|
    pacing: str = "linear"           # one of PACINGS
    dynamic_max_rounds: int = 4      # dapo_dynamic: candidate batches tried per step at most
    # --- rollouts ---
    group_size: int = 8              # G
    max_new_tokens: int = 48         # the longest worked solution is 40 tokens with its EOS
    temperature: float = 1.0
    top_p: float = 1.0
    # --- update ---
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    adv_eps: float = 1e-6
    kl_beta: float = 0.0
    mini_batches: int = 2            # optimizer steps per epoch over the batch
    ppo_epochs: int = 1
    kernel_impl: str = "auto"
    # --- evaluation / logging / checkpoints ---
    eval_every: int = 25
    eval_avg_k: int = 8              # also report avg@k (sampled, the paper's metric) when > 0
    spearman_prompts: int = 160      # prompts for the initial PPL vs pass-rate Spearman (0 = skip)
    spearman_samples: int = 16
    save_every: int = 25
    log_every: int = 1

    # ------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        need(self.pacing in PACINGS, f"pacing must be one of {', '.join(PACINGS)}; got {self.pacing!r}")
        need(self.total_steps >= 1, "total_steps must be >= 1")
        need(self.candidate_batch_size >= 1, "candidate_batch_size must be >= 1")
        need(0 < self.select_ratio <= 1, f"select_ratio must be in (0, 1]; got {self.select_ratio}")
        need(self.group_size >= 2, "group_size must be >= 2 (group-normalized advantages need a group)")
        need(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.temperature > 0, "temperature must be > 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.lr > 0, "lr must be > 0")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "need 0 <= eps_low < 1 and eps_high >= 0")
        need(self.kl_beta >= 0, "kl_beta must be >= 0")
        need(self.mini_batches >= 1 and self.ppo_epochs >= 1, "mini_batches and ppo_epochs must be >= 1")
        need(self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0 (0 = only at the end)")
        need(self.num_threads >= 1, "num_threads must be >= 1")
        need(self.train_size >= 1 and self.eval_per_level >= 1, "train_size and eval_per_level must be >= 1")
        need(self.dynamic_max_rounds >= 1, "dynamic_max_rounds must be >= 1")
        need(0 < self.heldout_frac < 1, "heldout_frac must be in (0, 1)")
        need(self.warmup_steps >= 0 and self.warmup_batch_size >= 1, "warmup_steps >= 0 and warmup_batch_size >= 1")
        need(0 <= self.warmup_slip_rate < 1, "warmup_slip_rate must be in [0, 1)")
        need(self.num_selected >= 1, "candidate_batch_size * select_ratio must select at least 1 prompt")
        return self

    @property
    def num_selected(self) -> int:
        """K = round(select_ratio * |B|), at least 1."""
        return max(1, int(round(self.select_ratio * self.candidate_batch_size)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _valid_keys() -> str:
    return ", ".join(sorted(FIELDS))


def _coerce(key: str, value: Any) -> Any:
    typ = _TYPES[key]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects a boolean (true/false), got {value!r}")
    if typ in (int, float):
        what = "an integer" if typ is int else "a number"
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                num = float(value)   # 3, 3.0, "3", "1e-4"
            except ValueError:
                num = None
            if num is not None and (typ is float or num.is_integer()):
                return typ(num)
        raise ConfigError(f"{key} expects {what}, got {value!r}")
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    return value


def _normalize(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def apply_overrides(cfg: TrainConfig, values: dict) -> TrainConfig:
    for raw_key, value in values.items():
        key = _normalize(str(raw_key))
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {raw_key!r}; valid keys: {_valid_keys()}")
        setattr(cfg, key, _coerce(key, value))
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value")
    return data


def parse_args(argv: Optional[Sequence[str]] = None, base: Optional[TrainConfig] = None) -> TrainConfig:
    """TrainConfig from defaults, ``--config file.yaml`` and ``--key value`` overrides (in order:
    file first, command line wins). A boolean key given alone (``--resume``) means true."""
    argv = list(argv or [])
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        raise SystemExit(0)
    pairs: list[tuple[str, Any]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; expected --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _normalize(key) in FIELDS and _TYPES[_normalize(key)] is bool and (nxt is None or nxt.startswith("--")):
                value, i = "true", i + 1
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 2
        if _normalize(key) == "config":
            config_file = value
        else:
            pairs.append((key, value))
    cfg = base if base is not None else TrainConfig()
    if config_file:
        apply_overrides(cfg, load_yaml(config_file))
    apply_overrides(cfg, dict(pairs))
    return cfg.validate()


def usage() -> str:
    lines = ["usage: python -m prepo.train [--config file.yaml] [--key value ...]", "", "keys (default):"]
    for name, f in FIELDS.items():
        lines.append(f"  --{name.replace('_', '-'):24s} {f.default!r}")
    return "\n".join(lines)


def from_dict(values: dict) -> TrainConfig:
    return apply_overrides(TrainConfig(), values).validate()
