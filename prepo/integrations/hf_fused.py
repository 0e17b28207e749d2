"""Per-token log-probs and entropies of a (possibly wrapped) Hugging Face causal LM through
prepo_kernels' fused LM head.

The model is called through its wrapper (DDP, PEFT, accelerate) so that the wrapper's forward
hooks run (DDP's gradient reduction depends on them); a forward hook on the decoder takes its last
hidden state, the model itself computes logits for one position only (``logits_to_keep=1``), and
:func:`prepo_kernels.hf.next_token_logprob_entropy` (the adapter ``causal_lm_logprob_entropy`` uses
too) projects the requested positions through the LM head weight without holding the [tokens, vocab]
logits.
"""
from __future__ import annotations

import torch
from torch import nn

from prepo_kernels.hf import decoder_and_head, next_token_logprob_entropy, position_ids


def tail_logprob_entropy(
    model: nn.Module,
    unwrapped: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_keep: int,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each of the last ``n_keep`` tokens of ``input_ids`` given its prefix, and the
    full-vocabulary entropy of the next-token distribution at those positions.

    Args:
        model: the causal LM as it is called in training (maybe wrapped); ``unwrapped`` the module
            inside it (``accelerator.unwrap_model(model)``), which owns the decoder and the head.
        input_ids, attention_mask: [B, T] (left or right padding); position ids are rebuilt from
            the mask as generation does.
        n_keep: 1 <= n_keep < T.
        temperature: the logits are divided by it.
    Returns:
        (logprob, entropy) [B, n_keep] float32 (entropy None unless ``compute_entropy``), in nats;
        0 where the token or its context position is padding. Differentiable when grad is enabled.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [B, T]")
    if not 1 <= n_keep < input_ids.size(1):
        raise ValueError(f"n_keep must be in [1, T) with T={input_ids.size(1)}, got {n_keep}")
    hidden, head = tail_hidden(model, unwrapped, input_ids, attention_mask)
    return next_token_logprob_entropy(hidden, head, input_ids, attention_mask, n_keep, temperature=temperature,
                                      compute_entropy=compute_entropy)


def tail_hidden(model: nn.Module, unwrapped: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
    """(the decoder's last hidden state [B, T, D], the LM head) of ``model`` called through its
    wrapper on ``input_ids`` / ``attention_mask`` [B, T] (arguments as in :func:`tail_logprob_entropy`)."""
    decoder, head = decoder_and_head(unwrapped)
    captured = []
    handle = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
              use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call in the model's forward, saw {len(captured)}")
    return captured[0], head
