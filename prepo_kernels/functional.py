"""Public functional API: fused per-token log-prob and full-vocabulary entropy."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from . import validation, vocab_parallel
from .autograd import fused_lle, group_name_of
from .backends import registry
from .backends.base import KernelParams, accumulation_dtype
from .reference import reference_linear_logprob_entropy

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: validation.Temperature = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    impl: str = "auto",
    params: Optional[KernelParams] = None,
    process_group: Optional[ProcessGroup] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of ``targets`` and entropy of the full softmax over z = (hidden @ weight.T + bias) / temperature,
    without materializing the [N, V] logits (forward or backward).

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 (float64 for checks).
        weight: [V, D], same dtype (the LM head).
        targets: [...] int64 token ids in [0, V), or ``ignore_index``.
        bias: optional [V].
        temperature: a float > 0, or a tensor broadcastable to ``targets`` (per-token temperature;
            treated as a constant, no gradient).
        ignore_index: targets equal to it give 0 for both outputs and receive no gradient.
        compute_entropy: if False the entropy is not computed (no extra cost) and None is returned.
        impl: "auto" (fastest available; env PREPO_KERNELS_IMPL overrides), "reference", "torch",
            "cpu", "triton" or "cuda".
        params: backend options (deterministic, grad_filter); compute_entropy above wins.
        process_group: the group over which the LM head is sharded by vocabulary (tensor parallel):
            ``weight`` [Vs, D] (and ``bias`` [Vs]) is then this rank's contiguous shard, rank r holding
            global rows [r*Vs, (r+1)*Vs); every rank passes the same hidden, the same GLOBAL targets in
            [0, Vs * world) and gets the global outputs. The hidden gradient is this rank's partial sum,
            left for the caller's all-reduce (Megatron's copy_to_tensor_model_parallel_region, or
            ``prepo_kernels.copy_to_vocab_parallel``). See ``prepo_kernels.vocab_parallel``.

    Returns:
        (logprob, entropy), each float32 (float64 for float64 inputs) with ``targets``' shape, in nats.
        Differentiable w.r.t. hidden, weight and bias through both outputs.

    Raises ValueError / TypeError naming the bad argument, and BackendUnavailableError for an
    ``impl`` that cannot run on the tensors' device.

    ``torch.compile(..., fullgraph=True)`` traces this function without a graph break, forward and
    backward. Types, dtypes, devices, shapes, scalar temperatures and ``impl`` are checked while
    tracing (the compiled graph is guarded on them, so a call with other shapes retraces and checks
    again); a failure there reaches the caller as Dynamo's exception (``torch._dynamo.exc.Unsupported``
    with fullgraph=True, its message quoting this function's ValueError/TypeError; without
    fullgraph Dynamo falls back to eager and the error itself is raised). Target ids and tensor
    temperatures are checked by custom ops inside the graph, at run time, so a compiled call raises
    exactly the ValueError an eager one does. The fused backends run inside the custom op
    ``prepo_kernels::fused_lle`` (see ``prepo_kernels.autograd``), which skips ignored rows in
    forward and zero-gradient rows in backward in compiled code too.
    """
    validation.check_linear_inputs(hidden, weight, targets, bias, ignore_index)
    backend = registry.resolve(impl, hidden.device)
    inv_temp = validation.temperature_per_row(temperature, targets, accumulation_dtype(hidden.dtype))
    vocab = weight.shape[0]
    if process_group is not None:
        if backend == "reference":
            raise ValueError(
                "impl='reference' does not support process_group (it differentiates materialized logits with "
                "torch autograd, which cannot see the collective); use a fused impl such as 'torch'"
            )
        vocab *= vocab_parallel.check_same_on_every_rank(
            process_group, hidden, weight, bias, targets, ignore_index, compute_entropy)
    y = validation.checked_targets(targets.reshape(-1), vocab, ignore_index)  # the one range check
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if backend == "reference":
        logprob, entropy = reference_linear_logprob_entropy(h2, weight, y, bias, inv_temp, ignore_index)
    else:
        params = params or DEFAULT_PARAMS
        logprob, entropy, _ = fused_lle(
            h2, weight, bias, y, inv_temp, ignore_index, backend, compute_entropy, params.deterministic,
            params.grad_filter, group_name_of(process_group),
        )
    shape = targets.shape
    return logprob.view(shape), entropy.view(shape) if compute_entropy else None


DEFAULT_PARAMS = KernelParams()
