"""Next-token log-prob and entropy for Hugging Face causal LMs, without running the LM head.

Runs the decoder to its final hidden states and hands them with the LM-head weight to
:func:`linear_logprob_entropy` (or, for a GRPO update, :func:`linear_grpo_loss`). Works for any
model whose output embedding is a plain ``nn.Linear`` applied to the decoder's last hidden state
(Qwen2, Qwen3, Llama, Mistral, ...).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import linear_logprob_entropy
from .grpo_loss import GRPOLossStats, linear_grpo_loss
from .validation import Temperature, check_tensor

IGNORE = -100
# config attributes that put a non-linear or scaled transform between hidden states and logits
_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "output_multiplier",
                       "lm_head_multiplier", "logits_scaling")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder (whose output's ``last_hidden_state`` feeds the head) and the plain linear LM head
    of an unwrapped HF causal LM; ValueError naming the reason for a model the fused path cannot
    serve (a logit transform after the head, a non-linear head, no decoder)."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # composite (e.g. vision-language) configs
        config = config.get_text_config()
    for attr in _UNSUPPORTED_CONFIG:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"unsupported model: config.{attr}={value} transforms the logits after the LM head; "
                "use logprob_entropy_from_logits on the model's logits instead"
            )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if type(head) is not nn.Linear:
        raise ValueError(
            f"unsupported model: its output embedding is {type(head).__name__}, not a plain nn.Linear "
            "over the decoder's last hidden state"
        )
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if get_decoder else None
    if decoder is None or decoder is model:
        raise ValueError(f"unsupported model: {type(model).__name__} exposes no decoder (get_decoder())")
    return decoder, head


def causal_lm_logprob_entropy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    temperature: Temperature = 1.0,
    compute_entropy: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each next token ``input_ids[:, 1:]`` and the entropy of the model's full
    next-token distribution at each position.

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` and a linear ``get_output_embeddings()``).
        input_ids: [B, T] int64, T >= 2.
        attention_mask: [B, T] 0/1 (left or right padding); position ids are rebuilt from it.
        temperature: float > 0, or a tensor broadcastable to [B, T-1] (per-token).
        compute_entropy: False returns None for the entropy at no cost.
    Returns:
        (logprob, entropy), each [B, T-1] float32. Position t scores token t+1; positions where the
        token or its context position is padding give 0 and get no gradient. Differentiable.
    """
    hidden, head = decoder_hidden(model, input_ids, attention_mask)
    return next_token_logprob_entropy(
        hidden, head, input_ids, attention_mask, input_ids.shape[1] - 1, temperature=temperature,
        compute_entropy=compute_entropy, impl=impl,
    )


def decoder_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, nn.Linear]:
    """(the decoder's last hidden state [B, T, D] for ``input_ids`` [B, T] int64 (T >= 2), the LM
    head) of an unwrapped HF causal LM; position ids are rebuilt from ``attention_mask`` [B, T] 0/1."""
    check_tensor("input_ids", input_ids, integer=True)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got shape {tuple(input_ids.shape)}")
    decoder, head = decoder_and_head(model)
    kwargs = {}
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        kwargs["position_ids"] = position_ids(attention_mask)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    return hidden, head


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask (left or right padding) -> [B, T] int64 position ids, as generation numbers
    them: 0 at each sequence's first real token, padding before it at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def next_token_logprob_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    n_keep: int,
    *,
    temperature: Temperature = 1.0,
    compute_entropy: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The fused LM head over the decoder's last hidden states: the log-prob of each of the last
    ``n_keep`` tokens of ``input_ids`` given its prefix and the entropy of the next-token
    distribution there.

    hidden [B, T, D] (the decoder's ``last_hidden_state`` for ``input_ids`` [B, T]); attention_mask
    [B, T] 0/1 or None; 1 <= n_keep < T. Returns [B, n_keep] float32 each (entropy None unless
    ``compute_entropy``), in nats; 0, and no gradient, where the token or its context position is
    padding. The one HF -> fused adapter: ``causal_lm_logprob_entropy`` and the trainer's
    ``prepo.integrations.hf_fused`` both end here."""
    return linear_logprob_entropy(
        tail_of(hidden, head, n_keep),
        head.weight,
        next_token_targets(input_ids, attention_mask, n_keep),
        bias=head.bias,
        temperature=temperature,
        ignore_index=IGNORE,
        compute_entropy=compute_entropy,
        impl=impl,
    )


def next_token_grpo_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    n_keep: int,
    old_logprob: Optional[torch.Tensor],
    advantages: torch.Tensor,
    **loss_kwargs,
) -> tuple[torch.Tensor, GRPOLossStats]:
    """:func:`linear_grpo_loss` over the last ``n_keep`` tokens of ``input_ids`` (1 <= n_keep < T),
    from the decoder's last hidden states, with the targets (and the padding they skip) of
    :func:`next_token_logprob_entropy`.

    hidden [B, T, D], input_ids / attention_mask [B, T]; old_logprob [B, n_keep] float or None
    (on-policy); advantages [B, 1] or [B, n_keep]; ``loss_kwargs`` (params, ref_logprob, temperature,
    num_tokens, ...) as in :func:`linear_grpo_loss`, whose (loss 0-d, stats with [B, n_keep] tensors)
    this returns."""
    return linear_grpo_loss(
        tail_of(hidden, head, n_keep), head.weight, next_token_targets(input_ids, attention_mask, n_keep),
        old_logprob, advantages, bias=head.bias, ignore_index=IGNORE, **loss_kwargs,
    )


def tail_of(hidden: torch.Tensor, head: nn.Linear, n_keep: int) -> torch.Tensor:
    """The hidden states that predict the last ``n_keep`` tokens, in the head's dtype (autocast may
    hand back another)."""
    return hidden[:, -n_keep - 1 : -1].to(head.weight.dtype)


def next_token_targets(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], n_keep: int) -> torch.Tensor:
    """[B, n_keep] the last ``n_keep`` tokens, IGNORE where the token or its context position is padding."""
    targets = input_ids[:, -n_keep:]
    if attention_mask is None:
        return targets
    valid = attention_mask[:, -n_keep:].bool() & attention_mask[:, -n_keep - 1 : -1].bool()
    return torch.where(valid, targets, IGNORE)
