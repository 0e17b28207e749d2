"""One RL step's LM-head work on SmolLM2-135M-Instruct (tied 49,152 x 576 head), on the CPU:
prepo's fused path beside HF/TRL's materialized-logits path, time and peak memory, one run.

    python benchmarks/bench_smollm2_lm_head.py                        # 64 rollouts x (64 + 192) tokens
    python benchmarks/bench_smollm2_lm_head.py --rollouts 16 --reps 1  # a smaller step

The step, as the trainer runs it (each phase in micro-batches of ``--micro-batch`` rollouts):

1. score: log-probs of the candidate prompts' tokens (|B| = 5 K prompts, K = rollouts / 8), no grad;
2. old: log-probs and full-vocabulary entropies of the completions, no grad;
3. update: the clipped GRPO surrogate (DAPO token-mean, clip 0.2 / 0.28) of the completions
   against the old log-probs of 2., random per-token advantages, backward into the hidden states
   and the head.

``fused`` = ``prepo_kernels.linear_logprob_entropy`` for 1. and 2. and ``linear_grpo_loss`` for 3.
(``impl="auto"``; the trainer's update uses the latter where it applies); ``materialized`` = logits
``h @ W.T`` then TRL's ``selective_log_softmax`` / ``entropy_from_logits`` and the surrogate on
the log-probs (what TRL's GRPO and HF models do). Hidden states are the model's real final hidden states over wordmath chats with
answers (a pool of rows, tiled to the batch), targets the real next tokens. Each path runs in its
own subprocess: peak RSS above the inputs (Linux VmHWM after a reset) over the whole step, then
the median of ``--reps`` timed steps. Writes ``benchmarks/results/smollm2_lm_head.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
TEMPERATURE = 0.7
EPS = (0.2, 0.28)   # DAPO's clip range (eps_low, eps_high)


def real_rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [n, 576], head weight [49152, 576], targets [n]): SmolLM2's final hidden states over
    wordmath chats with answers, rows tiled (in a random order) to ``n``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prepo.hub import resolve_model
    from prepo.tasks import get_task

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": f"The answer is {p.answer}."}]
             for p in get_task("wordmath").generate(8, seed)]
    hs, ys = [], []
    with torch.no_grad():
        for chat in chats:
            ids = tok(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt", add_special_tokens=False).input_ids
            hs.append(model.model(input_ids=ids).last_hidden_state[0, :-1])
            ys.append(ids[0, 1:])
    h, y = torch.cat(hs), torch.cat(ys)
    idx = torch.randint(len(y), (n,), generator=torch.Generator().manual_seed(seed))
    return h[idx].contiguous(), model.lm_head.weight.detach().clone(), y[idx].contiguous()


def head(path: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, entropy: bool):
    """(logprob [n], entropy [n] or None) of rows ``h`` with ``path``'s method."""
    if path == "fused":
        from prepo_kernels import linear_logprob_entropy

        return linear_logprob_entropy(h, w, y, temperature=TEMPERATURE, compute_entropy=entropy)
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = (h @ w.T) / TEMPERATURE
    return selective_log_softmax(logits, y), entropy_from_logits(logits) if entropy else None


def surrogate_backward(path: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, old: torch.Tensor,
                       adv: torch.Tensor) -> None:
    """Backward of the DAPO clipped surrogate (token-mean over the rows) with ``path``'s method."""
    if path == "fused":
        from prepo_kernels import GRPOLossParams, linear_grpo_loss

        loss, _ = linear_grpo_loss(h, w, y, old, adv, temperature=TEMPERATURE,
                                   params=GRPOLossParams(eps_low=EPS[0], eps_high=EPS[1]))
    else:
        ratio = torch.exp(head(path, h, w, y, entropy=False)[0] - old)
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS[0], 1 + EPS[1]) * adv).mean()
    loss.backward()


def step(path: str, args, data) -> dict:
    """One RL step's head work; seconds per phase."""
    prompt_h, prompt_y, comp_h, comp_y, w = data
    split = lambda t, rows: t.split(args.micro_batch * rows)  # noqa: E731 -- micro-batches of whole sequences
    out = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for h, y in zip(split(prompt_h, args.prompt_len), split(prompt_y, args.prompt_len)):
            head(path, h, w, y, entropy=False)
        out["score_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = [head(path, h, w, y, entropy=True)[0]
               for h, y in zip(split(comp_h, args.completion_len), split(comp_y, args.completion_len))]
        out["old_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    w = w.detach().requires_grad_()
    gen = torch.Generator().manual_seed(1)
    for h, y, lp_old in zip(split(comp_h, args.completion_len), split(comp_y, args.completion_len), old):
        adv = torch.randn(lp_old.shape, generator=gen)                      # advantages x weights
        lp_old = lp_old + 0.05 * torch.randn(lp_old.shape, generator=gen)   # a policy that moved: some tokens clip
        surrogate_backward(path, h.detach().requires_grad_(), w, y, lp_old, adv)
    out["update_s"] = time.perf_counter() - t0
    out["step_s"] = out["score_s"] + out["old_s"] + out["update_s"]
    return out


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(path: str, args) -> dict:
    torch.manual_seed(0)
    n_prompt = args.rollouts // 8 * 5 * args.prompt_len
    n_comp = args.rollouts * args.completion_len
    h, w, y = real_rows(n_prompt + n_comp)
    data = (h[:n_prompt], y[:n_prompt], h[n_prompt:], y[n_prompt:], w)
    step(path, argparse.Namespace(**{**vars(args), "rollouts": 1, "micro_batch": 1}),  # warm-up: library start-up
         (h[:args.prompt_len], y[:args.prompt_len], h[:args.completion_len], y[:args.completion_len], w))
    Path("/proc/self/clear_refs").write_text("5")
    base = status_kb("VmRSS")
    first = step(path, args, data)
    peak_mb = (status_kb("VmHWM") - base) / 1024
    runs = [first] + [step(path, args, data) for _ in range(args.reps - 1)]
    med = {k: statistics.median(r[k] for r in runs) for k in first}
    return {**med, "peak_extra_mb": peak_mb, "reps": args.reps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--micro-batch", type=int, default=16, help="rollouts (or prompts) per micro-batch")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["fused", "materialized"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    rows = {}
    for path in ("fused", "materialized"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", path], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{path} failed:\n{proc.stderr[-2000:]}")
        rows[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    command = "python benchmarks/bench_smollm2_lm_head.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    f, m = rows["fused"], rows["materialized"]
    lines = [
        "# One RL step's LM-head work on SmolLM2-135M-Instruct (CPU)", "",
        f"Command: `{command}`. Machine: {machine}. {args.rollouts} rollouts x ({args.prompt_len} prompt + "
        f"{args.completion_len} completion) tokens, {args.rollouts // 8 * 5} candidate prompts scored, micro-batches of "
        f"{args.micro_batch}, temperature {TEMPERATURE}, fp32; median of {args.reps} step(s).", "",
        "| path | score s | old log-prob + entropy s | update (fwd + bwd) s | step s | peak extra memory MB |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {r['score_s']:.2f} | {r['old_s']:.2f} | {r['update_s']:.2f} | {r['step_s']:.2f} | {r['peak_extra_mb']:.0f} |"
          for name, r in rows.items()),
        f"| fused / materialized | {f['score_s'] / m['score_s']:.2f} | {f['old_s'] / m['old_s']:.2f} | "
        f"{f['update_s'] / m['update_s']:.2f} | {f['step_s'] / m['step_s']:.2f} | {f['peak_extra_mb'] / max(m['peak_extra_mb'], 1):.3f} |",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_lm_head.md").write_text("\n".join(lines))
    (RESULTS / "smollm2_lm_head.json").write_text(json.dumps({"command": command, "machine": machine, **rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
