"""From a problem's prompt to token ids: the optional chat template, system prompt and instruction
suffix, then the tokenizer, with each distinct prompt encoded once (the candidate pool is
re-scored every step).

A prompt is a string or a list of chat messages (``{"role": ..., "content": ...}``). The chat
template is applied to a message list always, and to a string when ``chat_template`` is on (it
becomes one user message). The instruction suffix is appended to the string / the last user
message; the system prompt is added as a first message when the conversation has none. Without
a template the string is tokenized as is (with the tokenizer's own special tokens, e.g. the
built-in task's ``<bos>``); a templated text already holds its special tokens.

The prompt perplexity averages the log-probs of one span of the formatted prompt, ``ppl_scope``:

* ``problem``: the problem's own text (the string prompt, or the last user message's content),
  without the instruction suffix;
* ``user``: that text with the suffix (the whole last user message);
* ``prompt``: every token after the first (system turn, role headers and generation prompt included).

The tokens before the span (system turn, headers, earlier turns) condition it but are not
averaged. The span is found by character offsets in the formatted text, so the scopes other than
``prompt`` need a fast tokenizer (one that returns an offset mapping). Without a template and
without a suffix (the built-in tasks) the three scopes score the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import PPL_SCOPES
from .errors import ConfigError, DataError, ModelError
from .tasks import Prompt, prompt_key

_MARKER = "\x00prepo-scored-message\x00"   # stands in for the last user message when locating it


@dataclass(frozen=True)
class PromptFormat:
    chat_template: bool = False
    system_prompt: str = ""
    instruction_suffix: str = ""
    ppl_scope: str = "problem"    # one of PPL_SCOPES: the span the prompt perplexity averages
    template_kwargs: dict = field(default_factory=dict)   # extra apply_chat_template arguments (verl's)

    def __post_init__(self):
        if self.ppl_scope not in PPL_SCOPES:
            raise ConfigError(f"ppl_scope must be one of {', '.join(PPL_SCOPES)}; got {self.ppl_scope!r}")

    def messages(self, prompt: Prompt) -> list[dict]:
        msgs = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.instruction_suffix:
            last = _last_user(msgs, "cannot append the instruction suffix")
            msgs[last]["content"] = f"{msgs[last]['content']}\n{self.instruction_suffix}"
        if self.system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def uses_template(self, prompt: Prompt) -> bool:
        return isinstance(prompt, list) or self.chat_template

    def text(self, prompt: Prompt, tokenizer) -> str:
        """The prompt as the model sees it (chat template applied when it is used)."""
        if not self.uses_template(prompt):
            return f"{prompt}\n{self.instruction_suffix}" if self.instruction_suffix else prompt
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("a chat template is needed (the prompt is a message list or --chat-template is on) "
                              "but the model's tokenizer has none")
        return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True,
                                             **self.template_kwargs)

    def scored_chars(self, prompt: Prompt, text: str, tokenizer) -> tuple[int, int] | None:
        """The character span [start, end) of ``text`` (``prompt`` formatted by :meth:`text`) that
        ``ppl_scope`` scores; None for ``prompt`` (every token after the first). With a template the
        last user message is located by formatting the chat again with a marker in its place (a
        plain search could match the same characters in the template's own text)."""
        if self.ppl_scope == "prompt":
            return None
        if not self.uses_template(prompt):
            return 0, len(prompt) if self.ppl_scope == "problem" else len(text)
        msgs = self.messages(prompt)
        last = _last_user(msgs, f"ppl_scope {self.ppl_scope!r} scores the last user message")
        content = msgs[last]["content"]
        msgs[last] = {**msgs[last], "content": _MARKER}
        start = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                              **self.template_kwargs).find(_MARKER)
        if start < 0 or text[start : start + len(content)] != content:
            raise ModelError(f"the chat template does not reproduce the last user message of {prompt!r} verbatim, "
                             f"so ppl_scope {self.ppl_scope!r} cannot find it; use ppl_scope prompt")
        problem_len = len(content) - (len(self.instruction_suffix) + 1 if self.instruction_suffix else 0)
        return start, start + (problem_len if self.ppl_scope == "problem" else len(content))


def problem_text(prompt: Prompt) -> str:
    """The problem's own text: the string prompt, or a chat's last user message (its content)."""
    return prompt if isinstance(prompt, str) else prompt[_last_user(prompt, "no problem text")]["content"]


def _last_user(msgs: list[dict], why: str) -> int:
    """Index of the last user message of ``msgs``; a DataError starting with ``why`` if there is none."""
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        raise DataError(f"{why}: no user message in {msgs!r}")
    return last


class PromptEncoder:
    """Token ids of formatted prompts and the token span each one's perplexity scores (both cached
    per prompt: the candidate pool is re-scored every step), and left-padded batches of them."""

    def __init__(self, tokenizer, fmt: PromptFormat = PromptFormat()):
        if fmt.ppl_scope != "prompt" and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"ppl_scope {fmt.ppl_scope!r} finds the scored text by character offsets, which "
                              f"{type(tokenizer).__name__} cannot give (not a fast tokenizer); use ppl_scope prompt")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.pad_id = tokenizer.pad_token_id
        self._cache: dict[str, tuple[list[int], tuple[int, int]]] = {}

    def encode(self, prompt: Prompt) -> tuple[list[int], tuple[int, int]]:
        """(token ids, [lo, hi) token span of ``ppl_scope``)."""
        key = prompt_key(prompt)
        hit = self._cache.get(key)
        if hit is None:
            text = self.fmt.text(prompt, self.tokenizer)
            chars = self.fmt.scored_chars(prompt, text, self.tokenizer)
            # a templated text carries its own special tokens
            enc = self.tokenizer(text, add_special_tokens=not self.fmt.uses_template(prompt),
                                 return_offsets_mapping=chars is not None)
            ids = enc["input_ids"]
            if not ids:
                raise DataError(f"prompt {prompt!r} encodes to no tokens")
            hit = self._cache[key] = (ids, (1, len(ids)) if chars is None else _token_span(enc["offset_mapping"], chars))
        return hit

    def ids(self, prompt: Prompt) -> list[int]:
        return self.encode(prompt)[0]

    def __call__(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both [len(prompts), longest] int64 on the CPU, left-padded."""
        ids, mask, _ = self.scored(prompts)
        return ids, mask

    def scored(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, scored), each [len(prompts), longest] on the CPU, left-padded: int64 ids and
        attention mask, and a bool mask of the tokens whose log-probs the perplexity averages
        (never a row's first token, which has no log-prob)."""
        enc = [self.encode(p) for p in prompts]
        width = max(len(s) for s, _ in enc)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s, _ in enc], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s, _ in enc], dtype=torch.long)
        scored = torch.zeros_like(mask, dtype=torch.bool)
        for row, (s, (lo, hi)) in enumerate(enc):
            scored[row, width - len(s) + lo : width - len(s) + hi] = True
        return ids, mask, scored


def _token_span(offsets: Sequence[tuple[int, int]], chars: tuple[int, int]) -> tuple[int, int]:
    """[lo, hi): the tokens after the first whose characters overlap ``chars`` [start, end)
    (special tokens, which cover no characters, excepted); empty (lo == hi) when none does."""
    start, end = chars
    hit = [j for j, (s, e) in enumerate(offsets) if j >= 1 and e > s and e > start and s < end]
    return (hit[0], hit[-1] + 1) if hit else (1, 1)
