"""The contract every fused log-prob/entropy backend implements.

A backend sees only *dense, valid* rows: the autograd layer (``prepo_kernels.autograd``: the
custom ops ``prepo_kernels::fused_lle`` and ``fused_lle_backward``, which call ``forward`` and
``backward`` below from inside the op, so also from compiled graphs) has already dropped rows whose
target is ``ignore_index`` (forward) and rows whose upstream gradients are both zero (backward),
flattened leading dims, and turned the temperature into a per-row ``inv_temp``. So a backend never
checks for ignored targets and never skips rows itself.

Shapes and dtypes (n = number of rows handed to the backend, may be 0 only in backward):
    hidden    [n, D]  fp32 / bf16 / fp16 / fp64, contiguous
    weight    [V, D]  same dtype as hidden, contiguous
    bias      [V] same dtype, or None
    targets   [n]     int64, every value in [0, V) (the kernels never read outside the vocabulary:
                      an out-of-range id matches no column, so z_y is taken as 0)
    inv_temp  [n]     fp32 (fp64 when hidden is fp64), every value finite and > 0
    z = (hidden @ weight.T + bias) * inv_temp[:, None]   -- never materialized as [n, V]

Both take one record (:class:`ForwardInputs`, :class:`BackwardInputs`) holding these tensors and the
:class:`KernelParams`. Targets are checked once per call, by the public API, before any backend
runs; a backend does not check them again.

forward returns (logprob [n], entropy [n] or an empty tensor when not params.compute_entropy,
lse [n]); all in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    lse = logsumexp_v z,  logprob = z_y - lse,  entropy = lse - sum_v p_v z_v

backward (the rows plus grad_logprob g [n], grad_entropy e [n] or None, lse and entropy) returns
(grad_hidden [n, D], grad_weight [V, D], grad_bias [V] or None) in the accumulation dtype, except that a backend may return grad_weight already in the weight's dtype
(the native backends accumulate it in fp32 per vocab tile and write it once, so a bf16 LM head
never gets a [V, D] fp32 copy); the caller casts to the parameter dtypes. With
    dz_v = g (1[v=y] - p_v) - e p_v (z_v - lse + H)
grad_hidden = (dz * inv_temp) @ W, grad_weight = (dz * inv_temp).T @ hidden, grad_bias = sum_rows dz * inv_temp.
Entries with z_v = -inf (e.g. a -inf bias) have p_v = 0 and contribute exactly 0, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass(frozen=True)
class KernelParams:
    """Options that travel from the public API down to a backend, as one value.

    compute_entropy: compute the full-vocabulary entropy (else forward returns an empty entropy
        and backward receives ``grad_entropy=None``).
    deterministic: backends that could use atomics (triton) must not; results are bitwise
        reproducible run to run.
    grad_filter: for bf16/fp16 inputs only, let a backend skip vocab blocks whose probabilities
        are all below the dtype's rounding bound in backward (Cut Cross-Entropy's idea). Ignored for
        fp32/fp64 and by backends that do not implement it.
    """

    compute_entropy: bool = True
    deterministic: bool = False
    grad_filter: bool = True


Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Grads = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


@dataclass(frozen=True)
class ForwardInputs:
    """What a backend's ``forward`` gets: the dense rows (shapes and dtypes in the module docstring)
    and the options, as one value."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    inv_temp: torch.Tensor
    params: KernelParams


@dataclass(frozen=True)
class BackwardInputs(ForwardInputs):
    """What a backend's ``backward`` gets: the forward inputs of the rows that have a gradient, their
    upstream gradients and forward's saved statistics, as one value.

    grad_logprob [n]; grad_entropy [n], or None when the entropy gets no gradient (then ``entropy``
    may be empty and is not read); lse [n] and entropy [n] as forward returned them."""

    grad_logprob: torch.Tensor
    grad_entropy: Optional[torch.Tensor]
    lse: torch.Tensor
    entropy: torch.Tensor


class Backend(Protocol):
    """What the registry (``prepo_kernels.backends.registry``) holds for each impl name."""

    name: str
    # the one-pass row chunks of linear_grpo_loss (backends/grpo_chunks.py), or None: two passes
    grpo_chunks: object

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on ``device``, else a sentence saying why not."""

    def forward(self, x: ForwardInputs) -> Stats: ...

    def backward(self, x: BackwardInputs) -> Grads: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck, oracles); every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
