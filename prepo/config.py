"""The trainer's configuration: one dataclass, filled from defaults, then an optional YAML file
(``--config file.yaml``), then ``--key value`` / ``--key-with-dashes value`` / ``--key=value``
command-line overrides. Unknown keys, values of the wrong type and invalid settings are errors
(:class:`~prepo.errors.ConfigError`) whose message says what is valid.

:meth:`TrainConfig.validate` is the one check of the values themselves, run at load. What they
need of this machine and launch (the device, the vLLM extra, the kernel backend, the number of
torchrun processes) is :func:`prepo.preflight.preflight`'s, run before any data or model is
loaded. This module imports nothing of the trainer above it (registries and errors only).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from prepo_kernels.backends.registry import IMPLS

from .errors import ConfigError
from .signals.pacing import PACINGS
from .signals.strategies import STRATEGIES as _STRATEGY_REGISTRY
from .tasks import TASKS

STRATEGIES = tuple(_STRATEGY_REGISTRY)
# --dtype: the forward passes' autocast dtype (fp32: none) and the vLLM engine's weight dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENGINES = ("hf", "vllm")
PPL_SCOPES = ("problem", "user", "prompt")   # what the prompt perplexity averages (prepo.prompts)
CURRICULUM_DIRECTIONS = ("low_to_high", "high_to_low", "auto")   # prepo.signals.premise
VLLM_EXECUTION = ("auto", "eager", "compiled")   # how the vLLM engine runs (prepo.vllm_engine.device_options)
WARMUP_VERSION = 2  # bump when the warm-up code changes in a way that changes its result


def need(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


@dataclass
class WarmupConfig:
    """The built-in base model's supervised warm-up (:mod:`prepo.warmup`); its hash is the cache
    key. Set from the command line as ``--warmup-<field>`` (``--warmup-steps 50``); the task and
    the held-out fraction are the run's ``task`` and ``heldout_frac`` (copied in by
    :meth:`TrainConfig.validate`), so they are not keys of their own."""

    seed: int = 0
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    level_weights: tuple = ()    # the corpus's level mix; () = the task's own (arithmetic: many easy, few hard)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    prompt_loss_weight: float = 0.5
    slip_rate: float = 0.1       # corpus noise: probability that a worked-solution step is off by 1..3
    heldout_frac: float = 0.15
    task: str = "arithmetic"
    version: int = WARMUP_VERSION

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainConfig:
    # --- run ---
    strategy: str = "prepo"          # one of STRATEGIES
    total_steps: int = 200
    seed: int = 0
    output_dir: str = "runs/prepo"
    resume: bool = False             # continue from output_dir/checkpoints/last.pt
    num_threads: int = 1             # torch CPU threads (results depend on it; 1 is as fast for this tiny model and robust on a shared CPU)
    device: str = "cpu"              # cpu | cuda | cuda:N | auto (CUDA when available); cpu keeps the built-in run as it was
    dtype: str = "fp32"              # fp32 | bf16 | fp16: autocast compute, fp32 master weights and optimizer state
    gradient_checkpointing: bool = False
    progress: bool = True            # tqdm bar
    tensorboard: bool = True         # when installed
    # --- data / task ---
    task: str = "arithmetic"         # the built-in task (testbed): arithmetic | phrasing | countdown | wordmath (needs --model)
    train_data: str = ""             # jsonl / json / parquet / csv / save_to_disk dir ("" = the built-in task)
    eval_data: str = ""              # same formats ("" with train_data set = no evaluation)
    prompt_column: str = "prompt"    # a string or a list of chat messages
    answer_column: str = "answer"   # may be a dotted path (verl: reward_model.ground_truth, found by default)
    eval_prompt_column: str = ""     # eval_data's, when it differs ("" = prompt_column; MATH-500: problem)
    eval_answer_column: str = ""     # "" = answer_column
    train_size: int = 2000           # built-in task: training prompts (uniform over levels)
    eval_per_level: int = 40         # built-in task: held-out problems per level
    eval_min_level: int = 0          # built-in task: the easiest level the held-out split keeps (0 = every level)
    heldout_frac: float = 0.15       # built-in task (and its warm-up): share of prompts held out
    # --- prompts ---
    chat_template: bool = False      # apply the tokenizer's chat template to plain-string prompts too
    system_prompt: str = ""          # with a chat template: a system message (when the prompt has none)
    instruction_suffix: str = ""     # appended to the (last user message of the) prompt
    ppl_scope: str = "problem"       # the perplexity scores: problem (its text) | user (+ suffix) | prompt (all after the first)
    # --- reward ---
    reward: str = ""                 # module:function ("" = built-in checker / math_reward for user data)
    # --- base model ---
    model: str = ""                  # HF hub id or local directory ("" = the built-in warm-up model)
    cache_dir: str = ""              # warm-up cache (default ~/.cache/prepo or $PREPO_CACHE)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    # --- selection (PREPO curriculum) ---
    candidate_batch_size: int = 64   # |B|
    select_ratio: float = 0.2        # K / |B|
    pacing: str = "linear"           # one of PACINGS
    curriculum_direction: str = "low_to_high"   # the window's walk: low_to_high (the paper's) | high_to_low | auto
    premise_probes: int = 0          # of the K rollout slots, drawn uniformly outside the window (premise estimate)
    premise_window_steps: int = 5    # steps the running premise estimate pools
    dynamic_max_rounds: int = 4      # dapo_dynamic: candidate batches tried per step at most
    # --- rollouts ---
    rollout_engine: str = "hf"       # hf (model.generate on the policy) | vllm
    vllm_gpu_memory_utilization: float = 0.3   # vllm on cuda: share of the GPU's memory its engine may take
    vllm_cpu_kv_cache_gib: float = 1.0         # vllm on cpu: its KV cache in GiB of RAM
    vllm_execution: str = "auto"     # vllm: auto (cuda: compiled + CUDA graphs; cpu: eager) | eager | compiled
    vllm_check_every: int = 4        # vllm: check its log-probs against the policy's at the 1st weight sync and every N after (0 = never)
    vllm_check_tol: float = 0.0      # vllm: largest log-prob gap (nats) that passes the check; 0 = by dtype (fp32 0.01)
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
    max_tokens_per_microbatch: int = 8192   # padded tokens per forward/backward: bounds peak memory
    kernel_impl: str = "auto"        # prepo_kernels backend: auto | reference | torch | cpu | triton | cuda
    # --- evaluation / logging / checkpoints ---
    eval_every: int = 25
    eval_avg_k: int = 8              # also report avg@k (sampled, the paper's metric) when > 0
    spearman_prompts: int = 160      # prompts for the initial PPL vs pass-rate Spearman (0 = skip)
    spearman_samples: int = 16
    save_every: int = 25

    # ------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every option (raises :class:`ConfigError` naming it); copy the run's task and
        held-out fraction into the warm-up config."""
        self._check_values()
        self.warmup.task, self.warmup.heldout_frac = self.task, self.heldout_frac
        return self

    def _check_values(self) -> None:
        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        need(self.task in TASKS, f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        need(self.model or self.train_data or not TASKS[self.task].needs_model,
             f"task {self.task!r} is written for a pretrained chat model: name one with --model (e.g. smollm2-135m-instruct)")
        n_levels = TASKS[self.task].num_levels
        need(not self.warmup.level_weights or len(self.warmup.level_weights) == n_levels,
             f"warmup_level_weights must be {n_levels} numbers for task {self.task!r} (or empty for its default)")
        need(self.pacing in PACINGS, f"pacing must be one of {', '.join(PACINGS)}; got {self.pacing!r}")
        need(self.total_steps >= 1, "total_steps must be >= 1")
        need(self.candidate_batch_size >= 1, "candidate_batch_size must be >= 1")
        need(0 < self.select_ratio <= 1, f"select_ratio must be in (0, 1]; got {self.select_ratio}")
        need(self.group_size >= 2, "group_size must be >= 2 (group-normalized advantages need a group)")
        need(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.temperature > 0, "temperature must be > 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.lr > 0, "lr must be > 0")
        need(self.weight_decay >= 0, "weight_decay must be >= 0")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        need(self.adv_eps > 0, "adv_eps must be > 0")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "need 0 <= eps_low < 1 and eps_high >= 0")
        need(self.kl_beta >= 0, "kl_beta must be >= 0")
        need(self.mini_batches >= 1 and self.ppo_epochs >= 1, "mini_batches and ppo_epochs must be >= 1")
        need(self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0 (0 = only at the end)")
        need(self.eval_avg_k >= 0, "eval_avg_k must be >= 0 (0 = no avg@k)")
        need(self.spearman_prompts >= 0 and self.spearman_samples >= 1,
             "spearman_prompts must be >= 0 (0 = skip) and spearman_samples >= 1")
        need(self.num_threads >= 1, "num_threads must be >= 1")
        need(self.train_size >= 1 and self.eval_per_level >= 1, "train_size and eval_per_level must be >= 1")
        need(0 <= self.eval_min_level < n_levels, f"eval_min_level must be a level of task {self.task!r}, "
             f"0 to {n_levels - 1}; got {self.eval_min_level}")
        need(not self.train_data or self.eval_min_level == 0,
             "eval_min_level applies to the built-in task's held-out split; with --train-data the held-out "
             "problems are --eval-data's rows")
        need(self.dynamic_max_rounds >= 1, "dynamic_max_rounds must be >= 1")
        self._check_premise()
        need(0 < self.heldout_frac < 1, "heldout_frac must be in (0, 1)")
        self._check_warmup()
        need(self.ppl_scope in PPL_SCOPES, f"ppl_scope must be one of {', '.join(PPL_SCOPES)}; got {self.ppl_scope!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        need(self.rollout_engine in ENGINES, f"rollout_engine must be one of {', '.join(ENGINES)}; got {self.rollout_engine!r}")
        need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        need(self.kernel_impl in ("auto",) + IMPLS, f"kernel_impl must be one of auto, {', '.join(IMPLS)}; "
                                                    f"got {self.kernel_impl!r}")
        need(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization must be in (0, 1]")
        need(self.vllm_cpu_kv_cache_gib > 0, "vllm_cpu_kv_cache_gib must be > 0")
        need(self.vllm_check_every >= 0 and self.vllm_check_tol >= 0, "vllm_check_every and vllm_check_tol must be >= 0")
        need(self.vllm_execution in VLLM_EXECUTION,
             f"vllm_execution must be one of {', '.join(VLLM_EXECUTION)}; got {self.vllm_execution!r}")
        need(self.max_tokens_per_microbatch >= 1, "max_tokens_per_microbatch must be >= 1")
        need(bool(self.prompt_column) and bool(self.answer_column), "prompt_column and answer_column must be set")
        need(not self.eval_data or bool(self.train_data), "eval_data needs train_data (the built-in task has its own held-out split)")
        need(not self.reward or ":" in self.reward, f"reward must be module:function; got {self.reward!r}")

    def _check_premise(self) -> None:
        need(self.curriculum_direction in CURRICULUM_DIRECTIONS, "curriculum_direction must be one of "
             f"{', '.join(CURRICULUM_DIRECTIONS)}; got {self.curriculum_direction!r}")
        need(0 <= self.premise_probes < self.num_selected,
             f"premise_probes must be >= 0 and below the {self.num_selected} selected prompts; got {self.premise_probes}")
        need(self.premise_window_steps >= 1, "premise_window_steps must be >= 1")
        moving = _STRATEGY_REGISTRY[self.strategy]().moving_window
        need(moving or (self.curriculum_direction == "low_to_high" and self.premise_probes == 0),
             f"curriculum_direction and premise_probes steer a moving perplexity window (prepo, ppl_only); "
             f"strategy {self.strategy!r} has none")
        need(self.curriculum_direction != "auto" or self.premise_probes >= 1,
             "curriculum_direction auto needs premise_probes >= 1: the window alone sees one band of perplexity, "
             "which moves with training")

    def _check_warmup(self) -> None:
        w = self.warmup
        need(w.steps >= 0 and w.batch_size >= 1, "warmup_steps >= 0 and warmup_batch_size >= 1")
        need(0 <= w.slip_rate < 1, "warmup_slip_rate must be in [0, 1)")
        need(w.lr > 0 and w.prompt_loss_weight >= 0, "warmup_lr must be > 0 and warmup_prompt_loss_weight >= 0")
        need(min(w.hidden_size, w.num_layers, w.num_heads, w.num_kv_heads, w.intermediate_size) >= 1,
              "warmup_hidden_size, _num_layers, _num_heads, _num_kv_heads and _intermediate_size must be >= 1")
        need(w.hidden_size % w.num_heads == 0 and w.num_heads % w.num_kv_heads == 0,
              "warmup_hidden_size must be a multiple of warmup_num_heads, and that of warmup_num_kv_heads")
        need(all(x >= 0 for x in w.level_weights) and (not w.level_weights or sum(w.level_weights) > 0),
              "warmup_level_weights must be >= 0 with a positive sum")

    @property
    def num_selected(self) -> int:
        """K = round(select_ratio * |B|), at least 1."""
        return max(1, int(round(self.select_ratio * self.candidate_batch_size)))

    def to_dict(self) -> dict:
        """Plain JSON/YAML types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# flat keys: TrainConfig's own fields, and WarmupConfig's as warmup_<field> (-> (owner, attribute))
_NESTED_HIDDEN = ("heldout_frac", "task", "version")
_TYPES: dict[str, Any] = {}
_OWNER: dict[str, tuple[Optional[str], str]] = {}
for _f, _t in typing.get_type_hints(TrainConfig).items():
    if _t is WarmupConfig:
        for _wf, _wt in typing.get_type_hints(WarmupConfig).items():
            if _wf not in _NESTED_HIDDEN:
                _TYPES[f"warmup_{_wf}"], _OWNER[f"warmup_{_wf}"] = _wt, ("warmup", _wf)
    else:
        _TYPES[_f], _OWNER[_f] = _t, (None, _f)
FIELDS = {k: _OWNER[k] for k in _TYPES}


def _default(key: str) -> Any:
    owner, attr = _OWNER[key]
    return getattr(WarmupConfig() if owner else TrainConfig(), attr)


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
    if typ is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a comma-separated list of numbers, got {value!r}") from None
    return value


def _normalize(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def apply_overrides(cfg: TrainConfig, values: dict) -> TrainConfig:
    for raw_key, value in values.items():
        key = _normalize(str(raw_key))
        if key == "warmup" and isinstance(value, dict):  # the nested form config.yaml is saved in
            apply_overrides(cfg, {f"warmup_{k}": v for k, v in value.items() if k not in _NESTED_HIDDEN})
            continue
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {raw_key!r}; valid keys: {_valid_keys()}")
        owner, attr = _OWNER[key]
        setattr(getattr(cfg, owner) if owner else cfg, attr, _coerce(key, value))
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


def _field_notes() -> dict[str, str]:
    """key -> the comment beside its field in this module's source (the dataclasses' one-line docs)."""
    import inspect

    notes = {}
    for cls, prefix in ((TrainConfig, ""), (WarmupConfig, "warmup_")):
        for m in re.finditer(r"^ {4}(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M):
            notes[prefix + m.group(1)] = m.group(2).strip()
    return notes


def usage() -> str:
    """``--help``: every key with its default and what it is."""
    lines = ["usage: python -m prepo.train [--config file.yaml] [--key value ...]   (or: prepo train ...)", "",
             "Train a policy with PREPO or a baseline on the built-in task or your data; YAML first, the",
             "command line wins. Booleans: --key true|false, or --key alone for true.", "",
             "keys (default, what it is):"]
    notes = _field_notes()
    for name in FIELDS:
        lines.append(f"  --{name.replace('_', '-'):30s} {_default(name)!r:14s} {notes.get(name, '')}".rstrip())
    return "\n".join(lines)


def from_dict(values: dict) -> TrainConfig:
    return apply_overrides(TrainConfig(), values).validate()
