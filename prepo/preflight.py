"""What a valid configuration needs of this machine and launch: the device, the kernel backend,
the vLLM extra, the number of torchrun processes. :func:`preflight` runs before any data or model
is loaded, so a run that cannot work here stops at once with a :class:`~prepo.errors.ConfigError`
that says what to change. (:meth:`TrainConfig.validate` checks the values themselves.)"""
from __future__ import annotations

import os

import torch

from prepo_kernels.backends.registry import available_impls

from . import vllm_engine
from .config import TrainConfig, need
from .errors import ConfigError
from .signals.strategies import get_strategy


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` fail when CUDA or that device is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        need(torch.cuda.is_available(),
             f"device {name!r} was asked for but CUDA is not available on this machine (torch {torch.__version__}, "
             f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu or auto")
        dev = torch.device(name)
        need(dev.index is None or dev.index < torch.cuda.device_count(),
             f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device(name)


def preflight(cfg: TrainConfig) -> torch.device:
    """Check what ``cfg`` needs of this machine and launch (torchrun's WORLD_SIZE); the device the
    run uses (before a data-parallel rank picks its own GPU)."""
    device = resolve_device(cfg.device)
    if cfg.kernel_impl != "auto":
        impls = available_impls(device)
        need(cfg.kernel_impl in impls, f"kernel_impl {cfg.kernel_impl!r} is not available on {device}; "
                                       f"available: {', '.join(impls)}")
    if cfg.rollout_engine == "vllm":
        try:
            vllm_engine.require_vllm()
        except ImportError as exc:
            raise ConfigError(str(exc)) from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        need(cfg.rollout_engine != "vllm", "--rollout-engine vllm runs in one process only (each rank would build its own engine)")
        need(not get_strategy(cfg.strategy).single_process,
             f"{cfg.strategy} runs in one process only (its state is not shared across ranks)")
        need(cfg.num_selected >= world, f"{cfg.num_selected} selected prompts cannot be shared by {world} processes")
    return device
