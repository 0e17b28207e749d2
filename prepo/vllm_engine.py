"""A colocated vLLM rollout engine (``--rollout-engine vllm``, extra ``pip install -e .[vllm]``).

Written against vLLM 0.33.0's source (``vllm/entrypoints/llm.py``, ``vllm/sampling_params.py``,
``vllm/v1/worker/gpu_worker.py``, ``vllm/model_executor/models/utils.py``) and NOT RUN HERE: vLLM's
wheel pins its own CUDA torch and no machine of this project can run it. What does not need vLLM
(sampling options, weight names, the rollout layout, the bookkeeping, the missing-extra error) is
tested in tests/test_vllm_engine.py.

How it is used, per training step:

1. ``generate(prompts, G)`` yields :class:`~prepo.rollout.Rollouts` exactly as
   :class:`~prepo.rollout.HFGenerateEngine` does: our own prompt token ids (left-padded), the
   sampled ids right-padded, the mask 1 up to and including the stop token, text decoded by our
   tokenizer. vLLM's log-probs are never requested: the loss's old log-probs come from our forward.
2. ``sleep()`` frees the engine's GPU memory for the update (vLLM sleep level 2: weights and KV
   cache discarded; the weights are pushed again anyway).
3. ``sync_weights(model)`` after the optimizer step: wakes the weights, reloads them in place from
   the policy's parameters (``LLM.collective_rpc("reload_weights", ...)``: the worker's
   ``reload_weights(weights_iterator, is_checkpoint_format=True)``, which goes through the model's
   own ``load_weights`` and so takes Hugging Face checkpoint names), wakes the KV cache and drops
   the prefix cache (its KV was computed with the old weights).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so ``collective_rpc`` hands
the worker the trainer's tensors directly, without copies through another process.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .rollout import Rollouts, Sampling

log = logging.getLogger(__name__)

VLLM_VERSION = "0.33.0"   # the version this file was written against (setup.py's vllm extra)
INSTALL_HINT = "pip install -e .[vllm]"
SLEEP_LEVEL = 2

# Prefixes that wrappers put in front of a Hugging Face model's parameter names:
# torch.compile, DistributedDataParallel, FSDP and activation checkpointing.
_WRAPPER_PREFIXES = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|module|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def require_vllm():
    """The ``vllm`` module, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"--rollout-engine vllm needs vLLM: {INSTALL_HINT} (vLLM {VLLM_VERSION}; "
                          f"import failed: {exc})") from None
    if getattr(vllm, "__version__", VLLM_VERSION) != VLLM_VERSION:
        log.warning("vLLM %s is installed; prepo's engine was written against %s", vllm.__version__, VLLM_VERSION)
    return vllm


def sampling_params_kwargs(*, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                           top_p: float = 1.0, top_k: Optional[int] = 0, greedy: bool = False,
                           stop_token_ids: Sequence[int]) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one request: ``num_samples`` completions
    (``n``) of at most ``max_new_tokens`` tokens, stopping at any of ``stop_token_ids``. ``top_k`` 0 or
    None: no top-k, as in the HF engine. Greedy decoding is ``temperature=0`` with ``n=1`` (vLLM
    refuses ``n > 1`` greedy): the caller sends a greedy prompt once per sample. No log-probs and no
    detokenizing: the trainer computes its own log-probs and decodes with its own tokenizer."""
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    common = dict(max_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids), logprobs=None, detokenize=False)
    if greedy:
        return dict(n=1, temperature=0.0, **common)
    if not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature} (greedy decoding is greedy=True)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    top_k = top_k or 0
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or positive, got {top_k}")
    return dict(n=num_samples, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), **common)


def weight_names(names: Iterable[str]) -> dict[str, str]:
    """{policy parameter name: the Hugging Face checkpoint name vLLM's ``load_weights`` takes}.

    vLLM's loaders map checkpoint names to their fused layers themselves (q/k/v -> qkv_proj,
    gate/up -> gate_up_proj), skip a tied ``lm_head`` and drop rotary buffers, so a plain HF model's
    names pass unchanged; wrapper prefixes (torch.compile's ``_orig_mod.``, DDP's ``module.``,
    FSDP's) are stripped. LoRA adapters are refused: merge them first."""
    out = {}
    for name in names:
        if "lora_" in name:
            raise ValueError(f"parameter {name!r} is a LoRA adapter: merge the adapters before pushing weights to vLLM")
        out[name] = _WRAPPER_PREFIXES.sub("", name)
    return out


def rollouts_from_tokens(prompt_index: list[int], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         completions: Sequence[Sequence[int]], stopped: Sequence[bool], tokenizer) -> Rollouts:
    """:class:`Rollouts` from sampled token lists (one per row of ``prompt_ids``, [N, P] left-padded).
    A completion that ``stopped`` ends with its stop token, which the mask covers and the text
    leaves out; one that hit the length limit has no stop token. Rows are right-padded with the
    tokenizer's pad id."""
    if not (len(prompt_index) == len(completions) == len(stopped) == prompt_ids.shape[0]):
        raise ValueError(f"{len(prompt_index)} prompt indices, {len(completions)} completions, {len(stopped)} "
                         f"stop flags and {prompt_ids.shape[0]} prompt rows must match")
    width = max(1, max((len(c) for c in completions), default=0))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(completions), width), pad, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    texts = []
    for r, (toks, stop) in enumerate(zip(completions, stopped)):
        ids[r, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
        mask[r, : len(toks)] = 1
        texts.append(tokenizer.decode(list(toks[:-1] if stop else toks), skip_special_tokens=True))
    return Rollouts(prompt_index=list(prompt_index), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                    completion_ids=ids, completion_mask=mask, completions=texts)


class VLLMEngine:
    """Rollouts from a colocated vLLM engine: the :class:`~prepo.rollout.RolloutEngine` protocol.
    ``model_source``: the HF model directory the policy was loaded from (vLLM builds its own copy,
    then receives the policy's weights); ``encoder``: the trainer's
    :class:`~prepo.prompts.PromptEncoder`; ``sampling``: the :class:`~prepo.rollout.Sampling` the HF
    engine takes too; ``stop_ids``: the ids a completion stops at
    (:func:`prepo.rollout.stop_token_ids`; default the tokenizer's EOS)."""

    def __init__(self, model_source: str, tokenizer, encoder, sampling: Sampling, *, dtype: str = "bfloat16",
                 seed: int = 0, stop_ids: Sequence[int] = (), gpu_memory_utilization: float = 0.5,
                 max_model_len: Optional[int] = None, enable_sleep_mode: bool = True, chunk_prompts: int = 64):
        vllm = require_vllm()
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        sampling_params_kwargs(num_samples=1, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=stop_ids)  # fail at start
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=0 is forced: weights are pushed in this process")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.sampling = sampling
        self.stop_ids = list(stop_ids) or [tokenizer.eos_token_id]
        self.chunk_prompts = chunk_prompts
        self.sleep_enabled = enable_sleep_mode
        self.asleep = False
        self.llm = vllm.LLM(model=str(model_source), dtype=str(dtype).removeprefix("torch."), seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            enable_sleep_mode=enable_sleep_mode)

    def _params(self, num_samples: int, greedy: bool):
        sp = self.sampling
        return self._vllm.SamplingParams(**sampling_params_kwargs(
            num_samples=num_samples, max_new_tokens=sp.max_new_tokens, temperature=sp.temperature,
            top_p=sp.top_p, top_k=sp.top_k, greedy=greedy, stop_token_ids=self.stop_ids))

    def generate(self, prompts: Sequence[str], num_samples: int, *, greedy: bool = False) -> Iterator[Rollouts]:
        """Chunks of ``chunk_prompts`` prompts, each prompt's ``num_samples`` rows consecutive."""
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (its weights were discarded): call sync_weights(model) first")
        copies = num_samples if greedy else 1  # greedy is n=1, so a prompt goes once per sample
        params = self._params(num_samples, greedy)
        for start in range(0, len(prompts), self.chunk_prompts):
            chunk = list(prompts[start : start + self.chunk_prompts])
            requests = [self._vllm.TokensPrompt(prompt_token_ids=self.encoder.ids(p)) for p in chunk for _ in range(copies)]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            samples = [c for out in outputs for c in out.outputs]
            if len(samples) != len(chunk) * num_samples:
                raise RuntimeError(f"vLLM returned {len(samples)} completions for {len(chunk)} prompts x {num_samples}")
            ids, mask = self.encoder(chunk)
            ro = rollouts_from_tokens(
                [start + i // num_samples for i in range(len(samples))],
                ids.repeat_interleave(num_samples, dim=0), mask.repeat_interleave(num_samples, dim=0),
                [list(c.token_ids) for c in samples], [c.finish_reason == "stop" for c in samples], self.tokenizer)
            yield ro

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's parameters into the engine (after every update), waking it if asleep.
        vLLM's in-place reload takes checkpoint-format names, casts to its dtype, runs the layers'
        post-load processing, and warns about engine parameters that got no weight."""
        names = weight_names(n for n, _ in model.named_parameters())
        weights = [(names[n], p.detach()) for n, p in model.named_parameters()]
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) for the update; ``sync_weights`` wakes
        it (there is no separate wake-up: a level-2 sleep discards the weights)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = True
