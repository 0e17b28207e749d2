"""A run's setup, in the order it happens: the machine check (:func:`prepo.preflight.preflight`),
the data-parallel group, the seeds, the data and reward, the base model (the built-in warm-up
model is built on first use), the policy and its frozen reference, the prompt encoder, the
rollout engine, the learner (optimizer), the prompt sampler and the run's output files.
:func:`build_run` returns them as one :class:`RunParts`; :class:`prepo.train.Trainer` runs them.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import DTYPES, TrainConfig
from .distributed import Dist
from .errors import DataError
from .hub import resolve_model
from .learner import Learner
from .policy import Precision, load_policy
from .preflight import preflight
from .prompts import PromptEncoder, PromptFormat
from .report import RunLog
from .rewards import load_reward_fn
from .rollout import HFGenerateEngine, RolloutEngine, Sampling, stop_token_ids
from .sampler import PromptSampler
from .signals.strategies import Strategy, get_strategy
from .sources import DataSource, load_data
from .warmup import get_base_model_dir

log = logging.getLogger("prepo")


@dataclass
class RunParts:
    """Everything a run works with; ``model`` is the policy (``learner.model``)."""

    cfg: TrainConfig
    dist: Dist
    precision: Precision               # its device is this rank's
    data: DataSource
    reward_fn: Callable
    base_dir: Path | str               # the base model's folder (or hub id)
    warmup_seconds: float              # building the warm-up model (0: cached, or --model)
    model: torch.nn.Module
    tokenizer: object
    encoder: PromptEncoder
    engine: RolloutEngine
    learner: Learner
    strategy: Strategy
    sampler: PromptSampler
    select_rng: np.random.Generator
    runlog: RunLog


def make_engine(cfg: TrainConfig, model_source, model, tokenizer, encoder: PromptEncoder, precision: Precision):
    """The rollout engine ``--rollout-engine`` names, sampling with the config's options. vLLM builds
    its own copy of ``model_source`` and gets the policy's weights after every update."""
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if cfg.rollout_engine == "vllm":
        from .vllm_engine import VLLMEngine   # imports vLLM's own modules only when asked for

        return VLLMEngine(str(model_source), tokenizer, encoder, sampling, dtype=DTYPES[cfg.dtype], seed=cfg.seed,
                          stop_ids=stop_token_ids(model, tokenizer), device=precision.device.type,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                          cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib, execution=cfg.vllm_execution,
                          check_every=cfg.vllm_check_every, check_tol=cfg.vllm_check_tol or None)
    return HFGenerateEngine(model, tokenizer, encoder, sampling, autocast=precision.autocast)


def base_model(cfg: TrainConfig, dist: Dist) -> tuple[Path | str, float]:
    """(``--model``, or the built-in warm-up checkpoint, built on first use; seconds building)."""
    if cfg.model:   # a GGUF file or named model is converted to a cached HF folder (once)
        return resolve_model(cfg.model, cfg.cache_dir or None), 0.0
    t0 = time.perf_counter()
    if not dist.main:
        dist.barrier()     # rank 0 builds the warm-up; the others then find it cached
    path, built = get_base_model_dir(cfg.warmup, Path(cfg.cache_dir) if cfg.cache_dir else None, progress=True)
    if dist.main:
        dist.barrier()
    seconds = time.perf_counter() - t0 if built else 0.0
    if built:
        log.info("warm-up model built in %.1fs -> %s", seconds, path)
    return path, seconds


def _device_and_group(cfg: TrainConfig) -> tuple[torch.device, Dist]:
    """This rank's device (a data-parallel rank on CUDA takes GPU ``LOCAL_RANK``) and the group."""
    device = preflight(cfg)
    if device.type == "cpu" and torch.cuda.is_available():
        log.info("running on the CPU although CUDA is available: --device cuda (or auto) uses the GPU")
    dist = Dist.from_env(device.type)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def make_strategy(cfg: TrainConfig, data: DataSource) -> Strategy:
    """The run's selection strategy; one that selects by level gets the training problems' levels."""
    strategy = get_strategy(cfg.strategy)
    if strategy.needs_levels:
        levels = [p.difficulty for p in data.train]
        if None in levels:
            raise DataError(f"strategy {cfg.strategy!r} selects by difficulty level, and {levels.count(None)} of "
                            f"{len(levels)} training problems have none (a built-in task has levels; a data file "
                            "needs a 'difficulty' or 'level' column)")
        strategy.set_levels(levels)
    return strategy


def build_run(cfg: TrainConfig, reward_fn: Optional[Callable] = None) -> RunParts:
    """Set the run up (``reward_fn``: a Python reward function instead of ``cfg.reward``'s)."""
    device, dist = _device_and_group(cfg)
    precision = Precision(cfg.dtype, device)
    torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dist.rank)   # ranks sample different completions

    data = load_data(cfg)
    reward_fn = reward_fn or load_reward_fn(cfg)
    base_dir, warmup_seconds = base_model(cfg, dist)
    model, tokenizer = load_policy(base_dir, device, gradient_checkpointing=cfg.gradient_checkpointing)
    ref_model = None
    if cfg.kl_beta > 0:
        ref_model, _ = load_policy(base_dir, device)
        ref_model.requires_grad_(False)
    encoder = PromptEncoder(tokenizer, PromptFormat(cfg.chat_template, cfg.system_prompt, cfg.instruction_suffix,
                                                    cfg.ppl_scope))
    engine = make_engine(cfg, base_dir, model, tokenizer, encoder, precision)
    return RunParts(
        cfg=cfg, dist=dist, precision=precision, data=data, reward_fn=reward_fn, base_dir=base_dir,
        warmup_seconds=warmup_seconds, model=model, tokenizer=tokenizer, encoder=encoder, engine=engine,
        learner=Learner(cfg, model, ref_model, precision, dist), strategy=make_strategy(cfg, data),
        sampler=PromptSampler(len(data.train), cfg.seed), select_rng=np.random.default_rng([cfg.seed, 31337]),
        runlog=RunLog(Path(cfg.output_dir), cfg, enabled=dist.main))
