"""The one place that maps an ``impl`` name to a backend.

``impl="auto"`` picks the fastest backend available for the tensors' device; the environment
variable ``PREPO_KERNELS_IMPL`` replaces "auto" with a named backend. Asking for a backend that
cannot run raises :class:`BackendUnavailableError` saying why.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from .base import Backend

IMPLS = ("reference", "torch", "cpu", "triton", "cuda")
ENV_VAR = "PREPO_KERNELS_IMPL"

# module holding each fused backend (attribute BACKENDS: dict name -> Backend); imported lazily so
# a missing triton or an unbuilt extension costs nothing until asked for.
_MODULES = {
    "torch": "prepo_kernels.backends.torch_chunked",
    "cpu": "prepo_kernels.backends.cpp",
    "cuda": "prepo_kernels.backends.cpp",
    "triton": "prepo_kernels.backends.triton_backend",
}
# fastest first; "auto" takes the first that can run. On CPU triton runs only under its interpreter
# (TRITON_INTERPRET=1), the slowest of all.
_PREFERENCE = {"cpu": ("cpu", "torch", "triton"), "cuda": ("triton", "cuda", "torch")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _load(name: str) -> tuple[Optional[Backend], Optional[str]]:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # triton not installed, extension not built
        return None, f"{name} backend could not be imported ({exc})"
    return module.BACKENDS[name], None


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else why not."""
    if name == "reference":
        return None
    backend, why = _load(name)
    return why if backend is None else backend.unavailable_reason(torch.device(device))


def available_impls(device: torch.device | str | None = None) -> list[str]:
    """Every backend name that ``impl=`` accepts for tensors on ``device`` (default: cuda if present,
    else cpu), i.e. each one that runs there without :class:`BackendUnavailableError`: the fused
    backends fastest first (``impl="auto"`` takes the first), then "reference". On CPU with
    TRITON_INTERPRET=1 that includes "triton" (Triton's interpreter: slow, meant for tests), last."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    preferred = _PREFERENCE.get(device.type, ())
    names = preferred + tuple(n for n in _MODULES if n not in preferred)
    return [n for n in names if unavailable_reason(n, device) is None] + ["reference"]


def check_impl_name(impl: str) -> None:
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")


@torch.compiler.assume_constant_result
def resolve(impl: str, device: torch.device) -> str:
    """The backend name to run for ``impl`` on ``device`` (may be "reference").

    Under ``torch.compile`` it runs once, while tracing (it reads the environment and imports
    backends, which Dynamo does not trace), and its answer is a constant of the compiled graph."""
    check_impl_name(impl)
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in IMPLS:
                raise ValueError(f"{ENV_VAR}={env!r} is not one of {IMPLS} or 'auto'")
            impl = env
        else:
            return available_impls(device)[0]
    why = unavailable_reason(impl, device)
    if why is not None:
        raise BackendUnavailableError(f"impl={impl!r} is unavailable on {device}: {why}")
    return impl


def get(name: str) -> Backend:
    """The backend object for a resolved, available fused backend name."""
    backend, why = _load(name)
    if backend is None:
        raise BackendUnavailableError(why)
    return backend
