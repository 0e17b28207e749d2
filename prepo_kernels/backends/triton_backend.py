"""The "triton" backend: fused Triton kernels (prepo_kernels/triton/), CUDA devices, or CPU under
Triton's interpreter (TRITON_INTERPRET=1, slow; meant for tests).

Set TRITON_INTERPRET=1 before importing prepo_kernels: whether a kernel is interpreted is fixed when
it is defined, triton.language's own helpers are defined when triton is imported, and importing
prepo_kernels imports triton (its custom ops import torch._dynamo, which imports triton).

fp64 inputs are supported (tl.dot in fp64, "ieee" precision), chiefly so gradcheck can run through
the interpreter; on a GPU they work too but are slow (no fp64 tensor-core path is tuned here).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .base import BackwardInputs, ForwardInputs, Grads, Stats

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"triton is not importable ({exc})"


class TritonBackend:
    name = "triton"

    @property
    def grpo_chunks(self):
        """The one-pass GRPO chunks: torch matmuls, the row pass in prepo_kernels/triton/grpo_rows.py."""
        from prepo_kernels.triton.grpo_rows import triton_grad, triton_stats

        from .grpo_chunks import MatmulChunks

        return MatmulChunks(triton_stats, triton_grad)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        device = torch.device(device)
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") == "1":
                return None
            return ("triton runs on CUDA devices (set TRITON_INTERPRET=1, before importing prepo_kernels, "
                    "to run its interpreter on CPU)")
        return f"triton does not run on {device.type} devices"

    def forward(self, x: ForwardInputs) -> Stats:
        from prepo_kernels.triton import triton_forward

        return triton_forward(x)

    def backward(self, x: BackwardInputs) -> Grads:
        from prepo_kernels.triton import triton_backward

        return triton_backward(x)


BACKENDS = {"triton": TritonBackend()}
