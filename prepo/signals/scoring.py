"""Prompt perplexity under the current policy (PREPO step 1): one no-grad forward through the
project's fused kernel (no [tokens, vocab] logits held), exp(-mean log-prob of the prompt tokens).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

import torch

import prepo_kernels

from ..microbatch import token_chunks

if TYPE_CHECKING:  # the encoder is the caller's; signals import nothing from the trainer's other parts
    from ..prompts import Prompt, PromptEncoder


@torch.inference_mode()
def prompt_perplexity(model, encoder: "PromptEncoder", prompts: Sequence["Prompt"], *, impl: str = "auto",
                      max_tokens: int = 8192, autocast=contextlib.nullcontext) -> torch.Tensor:
    """[len(prompts)] float32 perplexities on the CPU. A prompt's scored tokens are all its tokens
    after the first (the built-in task's <bos>, a chat template's first marker). Runs under
    inference_mode (cheaper than no_grad; the result is only sorted, never differentiated), in
    micro-batches of at most ``max_tokens`` padded tokens."""
    device = next(model.parameters()).device
    ids, mask = encoder(prompts)
    out = []
    for rows in token_chunks(torch.arange(len(prompts)), ids.shape[1], max_tokens):
        width = int(mask[rows].sum(dim=1).max())  # left-padded: the last `width` columns hold every token
        i, m = ids[rows, -width:].to(device), mask[rows, -width:].to(device)
        with autocast():
            logprob, _ = prepo_kernels.causal_lm_logprob_entropy(model, i, m, compute_entropy=False, impl=impl)
        valid = (m[:, 1:] * m[:, :-1]).bool()
        out.append(prepo_kernels.sequence_perplexity(logprob, valid).float().cpu())
    return torch.cat(out)
