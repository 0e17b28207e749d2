"""Prompt perplexity under the current policy (PREPO step 1): one no-grad forward through the
project's fused kernel (no [tokens, vocab] logits held), exp(-mean log-prob) of the tokens the
prompt format's ``ppl_scope`` names (by default the problem's own text, not the chat template's).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Sequence

import torch

import prepo_kernels
import prepo_kernels.hf

from ..errors import DataError

from ..microbatch import length_batches, right_padded

if TYPE_CHECKING:  # the encoder is the caller's; signals import nothing from the trainer's other parts
    from ..prompts import Prompt, PromptEncoder


MIN_SHARED = 8      # a micro-batch whose prompts share fewer leading tokens runs them whole
MAX_PADDING = 0.25  # prompts of different lengths go in different micro-batches beyond this padding


@torch.inference_mode()
def prompt_perplexity(model, encoder: "PromptEncoder", prompts: Sequence["Prompt"], *, impl: str = "auto",
                      max_tokens: int = 8192, autocast=contextlib.nullcontext) -> torch.Tensor:
    """[len(prompts)] float32 perplexities on the CPU: exp(-mean log-prob) over the tokens the
    encoder's ``ppl_scope`` scores (:meth:`~prepo.prompts.PromptEncoder.scored`: the problem's text,
    the last user message, or every token after the first), each conditioned on all the tokens
    before it. Runs under inference_mode (cheaper than no_grad; the result is only sorted, never
    differentiated), in micro-batches of prompts of about one length (at most ``MAX_PADDING``
    padding, at most ``max_tokens`` padded tokens). A prompt whose scope holds no token after the
    first is a :class:`~prepo.errors.DataError`.

    Only what the score reads is computed. The decoder stops at each prompt's last scored token (the
    model is causal: the instruction suffix and the generation prompt after the problem cannot move
    its log-probs). The leading tokens a micro-batch's prompts share before any scored token (the
    chat template's system turn and user header: at least ``MIN_SHARED``) run once, and the rest of
    each prompt attends to their cached keys and values; the LM head runs only on the positions
    that predict the scored span."""
    ids, mask, scored = encoder.scored(prompts)
    empty = (~scored.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"prompt {prompts[empty[0]]!r} has no token to score after its first "
                         f"(ppl_scope {encoder.fmt.ppl_scope!r}); {len(empty)} such prompt(s)")
    needed = [_needed(ids[r], mask[r], scored[r]) for r in range(len(prompts))]
    out = torch.empty(len(prompts))
    for rows in length_batches([len(t) for t, _ in needed], max_tokens, max_padding=MAX_PADDING):
        toks = [needed[r] for r in rows]
        shared = _shared_prefix(toks)
        with autocast():
            out[rows] = _chunk_perplexity(model, toks, shared if shared >= MIN_SHARED else 0, impl).float().cpu()
    return out


def _needed(ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> tuple[list[int], list[bool]]:
    """One left-padded row [T] -> (its real tokens up to its last scored one, which of them are scored)."""
    start, last = int((mask == 0).sum()), int(scored.nonzero()[-1])
    return ids[start : last + 1].tolist(), scored[start : last + 1].tolist()


def _shared_prefix(rows: list[tuple[list[int], list[bool]]]) -> int:
    """How many leading tokens all ``rows`` (tokens, scored flags) have in common before the first
    scored token of any of them."""
    n = min(f.index(True) for _, f in rows)
    first = rows[0][0]
    for i in range(n):
        if any(t[i] != first[i] for t, _ in rows):
            return i
    return n


def _chunk_perplexity(model, rows: list[tuple[list[int], list[bool]]], shared: int, impl: str) -> torch.Tensor:
    """[B] perplexities of one micro-batch of (tokens, scored flags) rows whose first ``shared``
    tokens are the same (0: none shared). The shared tokens run once (batch 1) with a KV cache that
    the rows' right-padded rest attends to; the last shared position's hidden state predicts each
    rest's first token."""
    decoder, head = prepo_kernels.hf.decoder_and_head(model)
    device = head.weight.device
    rest = right_padded([t[shared:] for t, _ in rows], dtype=torch.long).to(device)
    flags = right_padded([f[shared:] for _, f in rows], dtype=torch.bool).to(device)
    rest_mask = right_padded([[1] * (len(t) - shared) for t, _ in rows], dtype=torch.long).to(device)
    B, R = rest.shape
    if shared == 0:   # the first token predicts nothing: the rows' own first tokens are their context
        hidden = decoder(input_ids=rest, attention_mask=rest_mask, use_cache=False).last_hidden_state
        tokens, tmask, flags = rest, rest_mask, flags[:, 1:]
    else:
        prefix = torch.tensor([rows[0][0][:shared]], device=device)
        pre = decoder(input_ids=prefix, use_cache=True)
        kw = _cache_argument(decoder)
        cache = getattr(pre, kw)
        cache.batch_repeat_interleave(B)
        positions = torch.arange(shared, shared + R, device=device).expand(B, R)
        full_mask = torch.cat([torch.ones(B, shared, dtype=rest_mask.dtype, device=device), rest_mask], dim=1)
        h_rest = decoder(input_ids=rest, attention_mask=full_mask, position_ids=positions, use_cache=True,
                         **{kw: cache}).last_hidden_state
        hidden = torch.cat([pre.last_hidden_state[:, -1:].expand(B, 1, -1), h_rest], dim=1)
        tokens = torch.cat([prefix[:, -1:].expand(B, 1), rest], dim=1)
        tmask = torch.cat([torch.ones(B, 1, dtype=rest_mask.dtype, device=device), rest_mask], dim=1)
    n_keep = tokens.shape[1] - 1
    logprob, _ = prepo_kernels.hf.next_token_logprob_entropy(hidden, head, tokens, tmask, n_keep,
                                                            compute_entropy=False, impl=impl)
    # logprob[:, t] is the log-prob of tokens[:, t + 1]
    return prepo_kernels.sequence_perplexity(logprob, flags)


def _cache_argument(decoder) -> str:
    """The name of the decoder's KV-cache argument and output: ``cache`` (transformers 5.2x on)
    or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
