"""Prompt perplexity under the current policy (PREPO step 1): one no-grad forward through the
project's fused kernel (no [tokens, vocab] logits held), exp(-mean log-prob) of the tokens the
prompt format's ``ppl_scope`` names (by default the problem's own text, not the chat template's).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

import torch

import prepo_kernels
import prepo_kernels.hf

from ..errors import DataError

from ..microbatch import token_chunks

if TYPE_CHECKING:  # the encoder is the caller's; signals import nothing from the trainer's other parts
    from ..prompts import Prompt, PromptEncoder


@torch.inference_mode()
def prompt_perplexity(model, encoder: "PromptEncoder", prompts: Sequence["Prompt"], *, impl: str = "auto",
                      max_tokens: int = 8192, autocast=contextlib.nullcontext) -> torch.Tensor:
    """[len(prompts)] float32 perplexities on the CPU: exp(-mean log-prob) over the tokens the
    encoder's ``ppl_scope`` scores (:meth:`~prepo.prompts.PromptEncoder.scored`: the problem's text,
    the last user message, or every token after the first), each conditioned on all the tokens
    before it. Runs under inference_mode (cheaper than no_grad; the result is only sorted, never
    differentiated), in micro-batches of at most ``max_tokens`` padded tokens. A prompt whose
    scope holds no token after the first is a :class:`~prepo.errors.DataError`.

    Only what the score reads is computed: the decoder stops at a micro-batch's last scored token
    (the model is causal: the instruction suffix and the generation prompt after the problem cannot
    move its log-probs), and the LM head runs only from its first scored token on (not over the
    system turn and headers before the problem)."""
    device = next(model.parameters()).device
    ids, mask, scored = encoder.scored(prompts)
    empty = (~scored.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"prompt {prompts[empty[0]]!r} has no token to score after its first "
                         f"(ppl_scope {encoder.fmt.ppl_scope!r}); {len(empty)} such prompt(s)")
    out = []
    for rows in token_chunks(torch.arange(len(prompts)), ids.shape[1], max_tokens):
        # left-padded: the last `width` columns hold every token; scored columns first..last
        start = ids.shape[1] - int(mask[rows].sum(dim=1).max())
        cols = scored[rows].any(dim=0).nonzero()[:, 0]
        first, last = int(cols[0]), int(cols[-1])
        i, m = ids[rows, start : last + 1].to(device), mask[rows, start : last + 1].to(device)
        with autocast():
            hidden, head = prepo_kernels.hf.decoder_hidden(model, i, m)
            logprob, _ = prepo_kernels.hf.next_token_logprob_entropy(hidden, head, i, m, last + 1 - first,
                                                                    compute_entropy=False, impl=impl)
        # logprob[:, t] is the log-prob of token first + t
        out.append(prepo_kernels.sequence_perplexity(logprob, scored[rows, first : last + 1].to(device)).float().cpu())
    return torch.cat(out)
