"""From a problem's prompt to token ids: the optional chat template, system prompt and instruction
suffix, then the tokenizer, with each distinct prompt encoded once (the candidate pool is
re-scored every step).

A prompt is a string or a list of chat messages (``{"role": ..., "content": ...}``). The chat
template is applied to a message list always, and to a string when ``chat_template`` is on (it
becomes one user message). The instruction suffix is appended to the string / the last user
message; the system prompt is added as a first message when the conversation has none. Without
a template the string is tokenized as is (with the tokenizer's own special tokens, e.g. the
built-in task's ``<bos>``); a templated text already holds its special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import DataError, ModelError
from .tasks import Prompt, prompt_key


@dataclass(frozen=True)
class PromptFormat:
    chat_template: bool = False
    system_prompt: str = ""
    instruction_suffix: str = ""

    def messages(self, prompt: Prompt) -> list[dict]:
        msgs = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.instruction_suffix:
            last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
            if last is None:
                raise DataError(f"cannot append the instruction suffix: no user message in {prompt!r}")
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
        return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)


class PromptEncoder:
    """Token ids of formatted prompts (cached per prompt) and left-padded batches of them."""

    def __init__(self, tokenizer, fmt: PromptFormat = PromptFormat()):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.pad_id = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, prompt: Prompt) -> list[int]:
        key = prompt_key(prompt)
        ids = self._cache.get(key)
        if ids is None:
            text = self.fmt.text(prompt, self.tokenizer)
            # a templated text carries its own special tokens
            ids = self.tokenizer(text, add_special_tokens=not self.fmt.uses_template(prompt))["input_ids"]
            if not ids:
                raise DataError(f"prompt {prompt!r} encodes to no tokens")
            self._cache[key] = ids
        return ids

    def __call__(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both [len(prompts), longest] int64 on the CPU, left-padded."""
        seqs = [self.ids(p) for p in prompts]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
        return ids, mask
