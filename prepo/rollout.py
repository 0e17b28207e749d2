"""Rollout engines and the one roll-out-and-reward path that training, evaluation and the
initial diagnostic share.

:class:`RolloutEngine` is what callers use of an engine: its tokenizer and prompt encoder, its
:class:`Sampling`, ``generate`` (chunks of :class:`Rollouts`), ``sync_weights`` and ``sleep``.
:class:`HFGenerateEngine` samples with Hugging Face ``generate`` on the live policy; the colocated
vLLM engine (:mod:`prepo.vllm_engine`) takes the same :class:`Sampling`. :func:`roll_out` rolls
problems out and rewards them; engines count nothing: the caller that keeps the rollouts
(:mod:`prepo.collect`) counts them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch

from .data import reward_columns
from .metrics import Timer
from .rewards import compute_rewards


@dataclass
class Rollouts:
    """A chunk of rollouts; row r belongs to prompt ``prompt_index[r]`` of the prompts given."""

    prompt_index: list[int]
    prompt_ids: torch.Tensor        # [N, P] left-padded
    prompt_mask: torch.Tensor       # [N, P]
    completion_ids: torch.Tensor    # [N, C] right-padded
    completion_mask: torch.Tensor   # [N, C] 1 on generated tokens up to and including the first EOS
    completions: list[str]          # decoded text before EOS

    def __len__(self) -> int:
        return len(self.prompt_index)

    @staticmethod
    def concat(chunks: Sequence["Rollouts"], pad_id: int) -> "Rollouts":
        if len(chunks) == 1:
            return chunks[0]
        P = max(c.prompt_ids.shape[1] for c in chunks)
        C = max(c.completion_ids.shape[1] for c in chunks)

        def lpad(t, width, value):
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        def rpad(t, width, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Rollouts(
            prompt_index=[i for c in chunks for i in c.prompt_index],
            prompt_ids=torch.cat([lpad(c.prompt_ids, P, pad_id) for c in chunks]),
            prompt_mask=torch.cat([lpad(c.prompt_mask, P, 0) for c in chunks]),
            completion_ids=torch.cat([rpad(c.completion_ids, C, pad_id) for c in chunks]),
            completion_mask=torch.cat([rpad(c.completion_mask, C, 0) for c in chunks]),
            completions=[s for c in chunks for s in c.completions],
        )

    def select(self, rows: Sequence[int]) -> "Rollouts":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return Rollouts(
            prompt_index=[self.prompt_index[r] for r in rows],
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            completions=[self.completions[r] for r in rows],
        )

    def full_sequences(self) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """(input_ids, attention_mask, completion slice of the [N, T-1] log-prob positions)."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        P = self.prompt_ids.shape[1]
        return ids, mask, slice(P - 1, ids.shape[1] - 1)


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled (both engines). ``top_k`` 0: no top-k."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class RolloutEngine(Protocol):
    tokenizer: object         # decodes completions; its pad id pads rollouts
    encoder: object           # :class:`~prepo.prompts.PromptEncoder`: prompt -> token ids
    sampling: Sampling

    def generate(self, prompts: Sequence, num_samples: int, *, greedy: bool = False) -> Iterator[Rollouts]:
        """Yield chunks of rollouts for ``prompts`` (each prompt ``num_samples`` times, grouped:
        a prompt's samples are consecutive rows of one chunk)."""
        ...

    def sync_weights(self, model) -> Optional[float]:
        """Make the next rollouts come from ``model``'s current weights (called after every update).
        Returns the engine's checked log-prob gap to ``model`` in nats, or None (not checked)."""
        ...

    def sleep(self) -> None:
        """Free the engine's own memory for the update (``sync_weights`` brings it back)."""
        ...


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """[N, C] 1 up to and including the first stop token (any of ``eos_id``), 0 after it."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_id, dtype=completion_ids.dtype)).long()
    before_or_at_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0
    return before_or_at_first_eos.long()


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids a rollout stops at (both engines): the tokenizer's EOS and the model's own
    ``generation_config`` EOS ids (a chat model's end-of-turn token)."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])})


class HFGenerateEngine:
    """Samples with ``model.generate`` from the live policy (no separate inference copy, so
    :meth:`sync_weights` has nothing to do). Prompts are encoded by ``encoder`` (chat template,
    suffix); rollouts come back on the CPU."""

    def __init__(self, model, tokenizer, encoder, sampling: Sampling, *, chunk_prompts: int = 64,
                 autocast=contextlib.nullcontext):
        self.encoder = encoder
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.chunk_prompts = chunk_prompts
        self.autocast = autocast
        self.stop_ids = stop_token_ids(model, tokenizer)

    def sync_weights(self, model) -> None:
        """Nothing to copy: generation runs on the policy itself (nothing to check: returns None)."""

    def sleep(self) -> None:
        """Nothing to free: the engine holds no memory of its own."""

    @torch.no_grad()
    def generate(self, prompts: Sequence, num_samples: int, *, greedy: bool = False) -> Iterator[Rollouts]:
        tok, sp = self.tokenizer, self.sampling
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.chunk_prompts):
            ids, mask = self.encoder(list(prompts[start : start + self.chunk_prompts]))
            ids = ids.repeat_interleave(num_samples, dim=0)
            mask = mask.repeat_interleave(num_samples, dim=0)
            kwargs = dict(do_sample=False) if greedy else dict(
                do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k)
            with self.autocast():
                out = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=sp.max_new_tokens,
                    eos_token_id=self.stop_ids, pad_token_id=tok.pad_token_id, **kwargs)
            comp = out[:, ids.shape[1]:].cpu()
            cmask = completion_mask_from_ids(comp, self.stop_ids)
            is_stop = torch.isin(comp, torch.tensor(self.stop_ids))
            texts = [tok.decode(row[m.bool() & ~stop], skip_special_tokens=True)
                     for row, m, stop in zip(comp, cmask, is_stop)]
            comp = torch.where(cmask.bool(), comp, tok.pad_token_id)
            yield Rollouts(
                prompt_index=[start + i // num_samples for i in range(len(texts))],
                prompt_ids=ids, prompt_mask=mask, completion_ids=comp,
                completion_mask=cmask, completions=texts,
            )


@dataclass
class Scored:
    """Rollouts with their rewards."""

    rollouts: Rollouts
    rewards: torch.Tensor   # [N] float32
    failures: int           # reward calls that raised (those rewards are 0)


def roll_out(engine: RolloutEngine, reward_fn: Callable, problems: Sequence, num_samples: int, *,
             greedy: bool = False, timer: Optional[Timer] = None) -> Scored:
    """``num_samples`` completions per problem (a problem's rows consecutive, in ``problems``
    order) and their rewards; ``timer`` times the phases as ``time_generate`` and ``time_reward``."""
    timer = timer or Timer()
    with timer("time_generate"):
        chunks = list(engine.generate([p.prompt for p in problems], num_samples, greedy=greedy))
        ro = Rollouts.concat(chunks, engine.tokenizer.pad_token_id)
    with timer("time_reward"):
        rows = [problems[i] for i in ro.prompt_index]
        rewards, failures = compute_rewards(reward_fn, [p.prompt for p in rows], ro.completions,
                                            **reward_columns(rows))
    return Scored(ro, torch.tensor(rewards, dtype=torch.float32), failures)
