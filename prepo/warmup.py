"""The built-in base model: a tiny Qwen2 (random init from a config) given a short supervised
warm-up on a built-in task's problems (:mod:`prepo.tasks`; the arithmetic task's mix is many
easy, few hard) with worked solutions, saved in Hugging Face format and cached, keyed by a hash
of the warm-up config.

The warm-up trains next-token prediction on the whole text ``<bos>prompt solution<eos>`` (prompt
tokens included, with weight ``prompt_loss_weight``), so the policy has a prompt distribution and
prompt perplexity means something: what the corpus shows often (the arithmetic task's easy levels,
the phrasing task's common phrasings) gets a low perplexity, which ties perplexity to the pass rate
as strongly as the task's design makes it (the negative correlation PREPO builds on).
The corpus is noisy: each solution step slips (is off by 1-3) with probability ``slip_rate``, so
the base policy solves a k-step problem with probability about (1 - slip_rate)^k -- pass rates
spread between 0 and 1, and there is something for RL with a verifier to fix. Every batch is fresh
problems (no epoch over a fixed set), so the model learns the steps rather than memorizing answers.
All log-probs go through ``prepo_kernels.causal_lm_logprob_entropy``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import prepo_kernels

from .config import WarmupConfig
from .tasks import get_task
from .tokenizer import build_tokenizer

log = logging.getLogger(__name__)


def make_model(cfg: WarmupConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def encode_sft(tokenizer, prompts: list[str], answers: list[str], prompt_loss_weight: float):
    """Left-padded ids of ``<bos>prompt answer<eos>``, attention mask, and per-target loss weights
    ([B, T-1]: ``prompt_loss_weight`` on prompt tokens, 1 on answer (solution) and EOS tokens)."""
    seqs, n_prompt = [], []
    for p, a in zip(prompts, answers):
        ids_p = tokenizer(p)["input_ids"]
        ids_a = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(ids_p + ids_a)
        n_prompt.append(len(ids_p))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    weight = torch.zeros((len(seqs), T - 1))
    for i, (s, npr) in enumerate(zip(seqs, n_prompt)):
        off = T - len(s)
        ids[i, off:] = torch.tensor(s)
        mask[i, off:] = 1
        # target position t scores token t+1; prompt targets are tokens 1..npr-1 of the sequence
        weight[i, off : off + npr - 1] = prompt_loss_weight
        weight[i, off + npr - 1 : T - 1] = 1.0
    return ids, mask, weight


def warmup(cfg: WarmupConfig, out_dir: Path, progress: bool = False) -> None:
    """Build the tokenizer and model, run the supervised warm-up, save both to ``out_dir``."""
    task = get_task(cfg.task)
    tokenizer = build_tokenizer(task.chars)
    model = make_model(cfg, tokenizer)
    problems = task.generate(  # fresh problems for every step
        cfg.steps * cfg.batch_size, cfg.seed + 1000, "train", level_weights=cfg.level_weights or task.warmup_level_weights,
        heldout_frac=cfg.heldout_frac, unique=False, for_warmup=True,
    )
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / max(1, cfg.steps))
    )
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        batch = problems[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        solutions = [task.corpus_solution(p, rng, cfg.slip_rate) for p in batch]
        ids, mask, weight = encode_sft(tokenizer, [p.prompt for p in batch], solutions, cfg.prompt_loss_weight)
        logprob, _ = prepo_kernels.causal_lm_logprob_entropy(model, ids, mask, compute_entropy=False)
        loss = -(logprob * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == cfg.steps - 1):
            log.info("warm-up step %d/%d loss %.4f (%.0fs)", step, cfg.steps, loss.item(), time.time() - t0)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "warmup_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREPO_CACHE", Path.home() / ".cache" / "prepo"))


def get_base_model_dir(cfg: WarmupConfig, cache_dir: Optional[Path] = None, progress: bool = False) -> tuple[Path, bool]:
    """Directory of the warm-up checkpoint for ``cfg``, made on first use (atomically: built in a
    temp dir, then renamed). Returns (path, built_now)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"warmup-{cfg.key()}"
    if (target / "warmup_config.json").is_file():
        return target, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".warmup-tmp-", dir=cache_dir))
    try:
        with torch.random.fork_rng():
            warmup(cfg, tmp, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its copy
            if not (target / "warmup_config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target, True
