"""Prompt perplexity under the current policy (PREPO step 1): one no-grad forward through the
project's fused kernel (no [tokens, vocab] logits held), exp(-mean log-prob of the prompt tokens).
"""
from __future__ import annotations

from typing import Sequence

import torch

import prepo_kernels


class PromptEncoder:
    """Tokenizes each distinct prompt once (the candidate pool is re-scored every step) and
    left-pads batches of cached ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, prompt: str) -> list[int]:
        ids = self._cache.get(prompt)
        if ids is None:
            ids = self._cache[prompt] = self.tokenizer(prompt)["input_ids"]
        return ids

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.ids(p) for p in prompts]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
        return ids, mask


@torch.inference_mode()
def prompt_perplexity(model, tokenizer, prompts: Sequence[str], *, impl: str = "auto", chunk: int = 256,
                      encoder: "PromptEncoder | None" = None) -> torch.Tensor:
    """[len(prompts)] float32 perplexities. The prompt's tokens are all tokens after <bos>.
    Runs under inference_mode (cheaper than no_grad; the result is only sorted, never differentiated)."""
    was_training = model.training
    if was_training:
        model.eval()
    encoder = encoder or PromptEncoder(tokenizer)
    out = []
    try:
        for s in range(0, len(prompts), chunk):
            ids, mask = encoder(prompts[s : s + chunk])
            logprob, _ = prepo_kernels.causal_lm_logprob_entropy(model, ids, mask, compute_entropy=False, impl=impl)
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            out.append(prepo_kernels.sequence_perplexity(logprob, valid))
    finally:
        if was_training:
            model.train()
    return torch.cat(out)
