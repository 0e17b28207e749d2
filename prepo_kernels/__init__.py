"""prepo_kernels: fused per-token log-prob, full-vocabulary entropy and sequence perplexity,
computed from hidden states and the LM-head weight without materializing the [tokens, vocab] logits.

    from prepo_kernels import linear_logprob_entropy, sequence_perplexity
    logprob, entropy = linear_logprob_entropy(hidden, lm_head.weight, targets)
"""
from .backends.base import KernelParams
from .backends.registry import BackendUnavailableError, available_impls
from .from_logits import logprob_entropy_from_logits
from .functional import linear_logprob_entropy
from .grpo_loss import GRPOLossStats, linear_grpo_loss
from .grpo_objective import GRPOLossParams, grpo_objective
from .hf import causal_lm_logprob_entropy
from .sequence import sequence_mean, sequence_perplexity
from .vocab_parallel import copy_to_vocab_parallel

__all__ = [
    "BackendUnavailableError",
    "GRPOLossParams",
    "GRPOLossStats",
    "KernelParams",
    "available_impls",
    "causal_lm_logprob_entropy",
    "copy_to_vocab_parallel",
    "grpo_objective",
    "linear_grpo_loss",
    "linear_logprob_entropy",
    "logprob_entropy_from_logits",
    "sequence_mean",
    "sequence_perplexity",
]
__version__ = "0.1.0"
