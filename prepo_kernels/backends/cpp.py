"""The "cpu" and "cuda" backends: the native extension ``prepo_kernels._C`` (csrc/).

Importing ``prepo_kernels._C`` registers two operators, ``torch.ops.prepo_kernels.lle_forward``
and ``lle_backward`` (schemas in csrc/ops.cpp, semantics in ``backends/base.py``). This module adds
their fake (meta) kernels, for ``torch.compile`` and ``torch.library.opcheck``. The raw ops have no
autograd formula of their own: gradients go through the one autograd path every backend shares,
``prepo_kernels::fused_lle`` (``prepo_kernels.autograd``), whose backward calls ``lle_backward``.

When the extension is not built, this module still imports: it warns once and both backends report
why they are unavailable (the registry then falls back to the pure-torch backend under "auto").
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .grpo_chunks import CppChunks
from .base import BackwardInputs, ForwardInputs, Grads, Stats, accumulation_dtype

try:
    from prepo_kernels import _C  # noqa: F401  (loading the library registers torch.ops.prepo_kernels.*)

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # not built (no compiler at install time, PREPO_BUILD_EXT=0) or ABI mismatch
    _C = None
    _IMPORT_ERROR = (
        f"the native extension prepo_kernels._C is not available ({exc}); build it with "
        "`pip install --no-build-isolation -e .` (needs a C++ compiler, and nvcc for the CUDA kernels)"
    )
    warnings.warn(
        f"prepo_kernels: {_IMPORT_ERROR}. The 'cpu'/'cuda' backends are disabled; "
        "impl='auto' uses the pure-torch backend instead.",
        RuntimeWarning,
        stacklevel=1,
    )

OP_FORWARD = "prepo_kernels::lle_forward"
OP_BACKWARD = "prepo_kernels::lle_backward"


def has_cuda_kernels() -> bool:
    """True when the extension is loaded and was built with its CUDA kernels."""
    if _C is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_FORWARD, "CUDA"))


# ------------------------------------------------------------------------------------------------
# fake kernels for the raw ops

if _C is not None:

    @torch.library.register_fake(OP_FORWARD)
    def _lle_forward_fake(hidden, weight, bias, targets, inv_temp, compute_entropy):
        torch._check(hidden.dim() == 2 and weight.dim() == 2, lambda: "hidden [n, D] and weight [V, D] expected")
        torch._check(hidden.shape[1] == weight.shape[1], lambda: "hidden and weight disagree on D")
        acc = accumulation_dtype(hidden.dtype)
        n = hidden.shape[0]
        logprob = hidden.new_empty((n,), dtype=acc)
        entropy = hidden.new_empty((n,) if compute_entropy else (0,), dtype=acc)
        lse = hidden.new_empty((n,), dtype=acc)
        return logprob, entropy, lse

    @torch.library.register_fake(OP_BACKWARD)
    def _lle_backward_fake(grad_logprob, grad_entropy, hidden, weight, bias, targets, inv_temp, lse, entropy):
        torch._check(hidden.dim() == 2 and weight.dim() == 2, lambda: "hidden [n, D] and weight [V, D] expected")
        acc = accumulation_dtype(hidden.dtype)
        grad_hidden = hidden.new_empty(hidden.shape, dtype=acc)
        grad_weight = torch.empty_like(weight)  # the weight's dtype (csrc/ops.cpp)
        grad_bias = weight.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=acc)
        return grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------------
# the Backend objects (base.py protocol)


class CppBackend:
    """Backend calling the native ops on ``device_type`` tensors."""

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type
        # the one-pass GRPO loss's row chunks: csrc/cpu/grpo_loss_cpu.cpp on CPU; none on CUDA (two passes)
        self.grpo_chunks = CppChunks() if device_type == "cpu" else None

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name!r} backend runs on {self.device_type} tensors, not {device.type}"
        if self.device_type == "cuda" and not has_cuda_kernels():
            return ("prepo_kernels._C was built without CUDA kernels (torch without CUDA, nvcc not found, "
                    "or PREPO_BUILD_CUDA=0 at install time)")
        return None

    # The ops' schemas (csrc/ops.cpp) list the tensors one by one; the records are unpacked here only.
    def forward(self, x: ForwardInputs) -> Stats:
        return torch.ops.prepo_kernels.lle_forward(
            x.hidden, x.weight, x.bias, x.targets, x.inv_temp, x.params.compute_entropy)

    def backward(self, x: BackwardInputs) -> Grads:
        grad_hidden, grad_weight, grad_bias = torch.ops.prepo_kernels.lle_backward(
            x.grad_logprob, x.grad_entropy, x.hidden, x.weight, x.bias, x.targets, x.inv_temp, x.lse, x.entropy)
        return grad_hidden, grad_weight, (grad_bias if x.bias is not None else None)


BACKENDS = {"cpu": CppBackend("cpu", "cpu"), "cuda": CppBackend("cuda", "cuda")}
