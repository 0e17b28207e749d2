"""The pure parts of PREPO's verl integration, on verl's own data structures (no Ray, no workers).

* Curriculum window over a candidate batch (a verl ``DataProto`` or the v1 trainer's ``TensorDict``):
  sort ascending by prompt perplexity, keep the ``K`` consecutive prompts that start at
  ``l = floor(rho * (|B| - K))`` (:func:`prepo.signals.pacing.window_select`).
* The extra log-prob pass that scores prompts: each templated prompt ``p`` with its scored span
  ``[lo, hi)`` (``ppl_scope``, :mod:`prepo.prompts`: by default the last user message's text)
  becomes one sample in the layout verl's agent loop writes (jagged ``prompts = p[:lo]``,
  ``responses = p[lo:hi]``; what follows the span cannot move its log-probs and is left out), so
  the actor's ``compute_log_prob`` returns the span's log-probs and the perplexity is
  ``exp(-mean)`` over them, as :func:`prepo.signals.scoring.prompt_perplexity` scores them.
* Relative-entropy weights from the old-log-prob pass: ``w_i = H_i / H_bar`` (token-weighted,
  detached, :func:`prepo.signals.weighting.relative_entropy_weights`), multiplied into ``advantages``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict

import prepo_kernels
from prepo.prompts import PromptEncoder, PromptFormat
from prepo.signals.pacing import window_select
from prepo.signals.weighting import relative_entropy_weights
from verl.protocol import DataProto


def select_window(candidates: DataProto | TensorDict, prompt_ppl: torch.Tensor, rho: float,
                  num_select: int) -> tuple[DataProto | TensorDict, torch.Tensor]:
    """The ``num_select`` rows of ``candidates`` in the perplexity window at ``rho`` (in [0, 1]),
    in ascending-perplexity order, and their indices ([num_select] int64).
    ``prompt_ppl``: [len(candidates)] float, one per row."""
    n = len(candidates)
    prompt_ppl = torch.as_tensor(prompt_ppl)
    if prompt_ppl.shape != (n,):
        raise ValueError(f"prompt_ppl must have shape ({n},) (one per candidate), got {tuple(prompt_ppl.shape)}")
    if not torch.isfinite(prompt_ppl).all():
        raise ValueError("prompt_ppl has non-finite values")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    idx = torch.from_numpy(window_select(prompt_ppl.double().cpu().numpy(), num_select, rho))
    if isinstance(candidates, DataProto):
        return candidates.select_idxs(idx), idx
    if isinstance(candidates, TensorDict):
        return candidates[idx], idx
    raise TypeError(f"candidates must be a verl DataProto or a TensorDict, got {type(candidates).__name__}")


def chat_prompt_spans(tokenizer, conversations: Sequence[Sequence[dict]], chat_template_kwargs=None,
                      ppl_scope: str = "problem") -> list[tuple[list[int], int, int]]:
    """Each conversation (a list of chat messages, verl's ``raw_prompt``) tokenized with the chat
    template and the generation prompt, as the rollout sees it, with the token span ``[lo, hi)``
    that ``ppl_scope`` scores: (ids, lo, hi) per conversation."""
    fmt = PromptFormat(ppl_scope=ppl_scope, template_kwargs=dict(chat_template_kwargs or {}))
    encoder = PromptEncoder(tokenizer, fmt)
    out = []
    for messages in conversations:
        ids, (lo, hi) = encoder.encode([dict(m) for m in messages])
        out.append((list(ids), lo, hi))
    return out


def prompt_scoring_fields(spans: Sequence[tuple[Sequence[int], int, int]]) -> TensorDict:
    """One sample per (ids, lo, hi) in the jagged layout of verl's agent loop (``prompts``,
    ``responses``, ``input_ids``, ``position_ids``, ``response_mask``, ``loss_mask``; int64, nested
    along the token dimension): ``ids[:lo]`` as "prompt", the scored ``ids[lo:hi]`` as "response"."""
    if len(spans) == 0:
        raise ValueError("no prompts to score")
    empty = [i for i, (ids, lo, hi) in enumerate(spans) if not 1 <= lo < hi <= len(ids)]
    if empty:
        raise ValueError(f"prompts {empty[:5]} have no token to score after their first")
    seqs = [torch.as_tensor(list(ids[:hi]), dtype=torch.int64) for ids, _, hi in spans]

    def jagged(parts):
        return torch.nested.as_nested_tensor(parts, layout=torch.jagged)

    response_mask = jagged([torch.ones(hi - lo, dtype=torch.int64) for _, lo, hi in spans])
    return TensorDict({
        "prompts": jagged([s[:lo] for s, (_, lo, _) in zip(seqs, spans)]),
        "responses": jagged([s[lo:] for s, (_, lo, _) in zip(seqs, spans)]),
        "input_ids": jagged(seqs),
        "position_ids": jagged([torch.arange(len(s), dtype=torch.int64) for s in seqs]),
        "response_mask": response_mask,
        "loss_mask": response_mask.clone(),
    }, batch_size=len(seqs))


def perplexity_from_response_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """[N] float32 perplexities from the response log-probs of :func:`prompt_scoring_fields`'
    samples: a jagged nested [N, j] tensor (as ``response_from_nested`` returns it)."""
    if not log_probs.is_nested:
        raise ValueError("log_probs must be the jagged nested tensor of the scoring pass")
    lengths = log_probs.offsets().diff()
    padded = log_probs.to_padded_tensor(0.0).float()
    mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return prepo_kernels.sequence_perplexity(padded, mask)


def weight_advantages(data: DataProto) -> torch.Tensor:
    """Multiply ``data.batch["advantages"]`` [N, T] in place by ``w_i = H_i / H_bar`` computed from
    ``entropy`` [N, T] (the old-log-prob pass's per-token entropies) over ``response_mask`` [N, T].
    Returns w [N] float32 (detached)."""
    missing = [k for k in ("advantages", "entropy", "response_mask") if k not in data.batch.keys()]
    if missing:
        raise KeyError(f"DataProto lacks {missing}: the entropy weights need the old-log-prob pass's "
                       "'entropy' (not computed in rollout_correction.bypass_mode) and verl's 'advantages'")
    adv, ent, mask = (data.batch[k] for k in ("advantages", "entropy", "response_mask"))
    if not adv.shape == ent.shape == mask.shape:
        raise ValueError(f"advantages {tuple(adv.shape)}, entropy {tuple(ent.shape)} and response_mask "
                         f"{tuple(mask.shape)} must have the same [N, T] shape")
    w = relative_entropy_weights(ent, mask)
    data.batch["advantages"] = adv * w.to(adv.dtype).unsqueeze(1)
    return w

