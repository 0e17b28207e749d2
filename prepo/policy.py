"""The policy: a Hugging Face causal LM and its tokenizer on a device, with a numeric precision.

Precision (``--dtype``): the weights and the optimizer state stay float32 ("master weights") and
the forward passes run under ``torch.autocast`` in bf16 / fp16. Why not pure bf16 weights: an
AdamW step at RL learning rates (1e-6 on a weight of size ~1e-2) is below bf16's resolution
(8 bits of mantissa), so most updates would round away. The price is 4 bytes a parameter more
than bf16 weights (1.5B parameters: 6 GB), which a GPU that trains the model has. fp16 adds a
dynamic loss scaler (:class:`torch.amp.GradScaler`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DTYPES
from .errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class Precision:
    """Autocast dtype of the forward passes (None = plain fp32) on ``device``."""

    dtype: str
    device: torch.device

    def autocast(self):
        dt = DTYPES[self.dtype]
        if dt is torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dt)

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        return torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None


def load_policy(source: str | Path, device: torch.device, *, gradient_checkpointing: bool = False):
    """(model, tokenizer) from a local directory or a Hugging Face hub id (resolved through the
    local HF cache when offline), fp32 weights on ``device``, in eval mode (dropout stays off for
    the whole run, as in TRL's GRPO: rollouts, old log-probs and the update see one function)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:
        where = "is not a local directory and could not be loaded from the Hugging Face hub or its local cache"
        raise ModelError(f"model {source!r} {where} (offline? download it first with "
                          f"`huggingface-cli download {source}` or pass a local directory): {exc}") from None
    except ValueError as exc:   # e.g. a config.json naming an architecture transformers does not know
        raise ModelError(f"model {source!r} could not be loaded: {exc}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # e.g. Llama: pad with EOS (padding is masked everywhere)
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model {source!r}: its tokenizer has no EOS token, so completions cannot end")
    model.to(device)
    model.eval()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # HF recomputes a layer only while that layer is in training mode; the run keeps the model in
        # eval mode (no dropout), so flag the checkpointed layers alone (their children stay in eval)
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.training = True
    return model, tokenizer
