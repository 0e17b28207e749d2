"""Checkpoints: model, optimizer, RNG states (python, numpy, torch CPU and CUDA), sampler / selection state and
counters in one file, written atomically (temp file in the same directory, fsync, os.replace), so
a run killed at any instant leaves either the previous or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

LAST = "last.pt"


def rng_state() -> dict:
    """This process's RNG states; ``cuda`` (every visible device's) None without CUDA."""
    return {"python": random.getstate(), "numpy_global": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy_global"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():   # sampling on the GPU draws from these
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` or nothing: a failed write leaves the old file and no temp file behind, and
    says how much room the disk had (torch reports a full disk only as "unexpected pos")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):
            free = shutil.disk_usage(path.parent).free / 2**30
            raise OSError(f"writing {path} failed with {free:.2f} GiB free on its disk; the previous file is "
                          f"untouched. {type(exc).__name__}: {exc}") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(ckpt_dir: Path, state: dict) -> Path:
    path = Path(ckpt_dir) / LAST
    atomic_torch_save(state, path)
    return path


def load_checkpoint(ckpt_dir: Path) -> Optional[dict]:
    path = Path(ckpt_dir) / LAST
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
