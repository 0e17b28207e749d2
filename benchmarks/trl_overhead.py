"""Cost of PREPO's extra fused passes inside TRL's GRPO step -- ``python benchmarks/trl_overhead.py``

Trains a small random Qwen2 (full Qwen vocabulary, built offline with tests/conftest.py's tokenizer)
with :class:`prepo.integrations.trl.PrepoGRPOTrainer` for a few steps on CPU and times the two
passes PREPO adds to TRL's step: the candidates' prompt-perplexity scoring (curriculum) and the
no-grad completion-entropy pass (weighting; absent when TRL's own old-log-prob pass supplies the
entropies). Prints one JSON line: seconds per step of each pass, the mean step time, and each pass
as a fraction of it (the first step, which warms up, is excluded).

  OMP_NUM_THREADS=2 python benchmarks/trl_overhead.py                 # defaults below
  python benchmarks/trl_overhead.py --hidden 256 --completion 64 --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # this checkout's prepo, and the offline tokenizer builder


def build_trainer_class():
    from prepo.integrations.trl import PrepoGRPOTrainer

    class Timed(PrepoGRPOTrainer):
        """Accumulates per-generation seconds of the scoring and the entropy pass, and step ends."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.timings = {"score": [], "entropy": [], "step_end": []}

        def _timed(self, key, fn, *a):
            start = time.perf_counter()
            out = fn(*a)
            self.timings[key].append(time.perf_counter() - start)
            return out

        def _score_candidates(self, prompts):
            return self._timed("score", super()._score_candidates, prompts)

        def _completion_entropy(self, output):
            return self._timed("entropy", super()._completion_entropy, output)

        def training_step(self, *a, **k):
            out = super().training_step(*a, **k)
            self.timings["step_end"].append(time.perf_counter())
            return out

    return Timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--completion", type=int, default=32, help="max_completion_length")
    ap.add_argument("--generations", type=int, default=4, help="num_generations G")
    ap.add_argument("--prompts", type=int, default=2, help="K: prompts rolled out per step")
    ap.add_argument("--multiple", type=int, default=5, help="prepo_candidate_multiple")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-fused", action="store_true", help="TRL's own log-prob path in the loss")
    args = ap.parse_args()

    import datasets
    from conftest import build_qwen_tokenizer
    from transformers import AutoModelForCausalLM, Qwen2Config

    from prepo.integrations.trl import PrepoGRPOConfig

    tok = build_qwen_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_prompts = args.multiple * args.prompts * (args.steps + 1)
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Problem {i}: add {i} and "
                                                    f"{3 * i + 1}, then explain." + " Be brief." * (i % 5)}]
                                                  for i in range(n_prompts)]})

    def reward(completions, **kw):
        return [float(len(c[0]["content"]) % 7) for c in completions]

    with tempfile.TemporaryDirectory() as out:
        cfg = PrepoGRPOConfig(output_dir=out, per_device_train_batch_size=args.generations * args.prompts,
                              num_generations=args.generations, max_completion_length=args.completion,
                              max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
                              use_cpu=True, bf16=False, prepo_candidate_multiple=args.multiple,
                              prepo_fused_logprobs=not args.no_fused, disable_tqdm=True)
        trainer = build_trainer_class()(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                                        processing_class=tok)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    t = trainer.timings
    ends = t["step_end"]
    step_s = (ends[-1] - ends[0]) / (len(ends) - 1)  # steps 2..N: from the end of step 1 to the end of step N
    score_s = sum(t["score"][1:]) / (len(t["score"]) - 1)
    entropy_s = sum(t["entropy"][1:]) / max(len(t["entropy"]) - 1, 1)
    print(json.dumps(dict(
        torch_threads=torch.get_num_threads(), hidden=args.hidden, layers=args.layers, vocab=len(tok),
        completion=args.completion, G=args.generations, K=args.prompts, candidates=args.multiple * args.prompts,
        fused_loss=not args.no_fused, steps=args.steps, total_s=round(total, 2), step_s=round(step_s, 3),
        score_s=round(score_s, 3), entropy_s=round(entropy_s, 3),
        score_frac=round(score_s / step_s, 3), entropy_frac=round(entropy_s / step_s, 3),
    )))


if __name__ == "__main__":
    main()
