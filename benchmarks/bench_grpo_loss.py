"""Benchmark the fused linear GRPO loss (forward + backward), variant by variant, against the bare
matmuls, the two-pass path through linear_logprob_entropy, TRL 1.16's chunked log-prob head with the
same loss, and Liger's LigerFusedLinearGRPOLoss (CPU; liger-kernel's chunked losses run through torch).

    flock /tmp/prepo-bench.lock python benchmarks/bench_grpo_loss.py    # full run, writes benchmarks/results/
    python benchmarks/bench_grpo_loss.py --quick                        # tiny shapes, a smoke test

Providers (each computes loss.backward() of the variant's loss w.r.t. hidden and weight):
    matmul_3 / matmul_4   the three / four bare [N, D] x [D, V] matmuls in the inputs' dtype (the floors)
    matmul_4_fp32         matmul_4 on fp32 copies of bf16 inputs: on CPUs without native bf16 GEMMs
                          (AVX2) ATen's bf16 matmul is several times slower than fp32, so this is
                          the floor a bf16 design can actually reach there
    lle_cpu               linear_logprob_entropy(impl="cpu") + grpo_objective (two passes, four matmuls)
    grpo_cpu / grpo_torch linear_grpo_loss(impl=...)
    trl_chunked           TRL's ChunkedLogProbFunction (its fused LM head: log-probs and entropies) +
                          grpo_objective, the loss TRL's GRPOTrainer computes
    liger                 liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (compiled=False), where it
                          has the variant ("n/a" otherwise: no entropy bonus, quantile or off-policy mask)
Variants (GRPOLossParams), one per loss type TRL computes plus the KL and sequence-level options:
grpo, bnpo, dr_grpo, dapo, cispo, sapo_entropy (sapo with an entropy bonus), luspo, grpo_kl (beta 0.04,
bias-corrected KL) take one pass; grpo_sequence (sequence-level ratios) and vespo take two. Rows are
512-token sequences.
Inputs: random (--shape; the weight scaled to a mean token entropy of about 1.5 nats), or with
--model smollm2 SmolLM2-135M-Instruct's real tied head [49152, 576] and its real final hidden states
over wordmath chats (bench_smollm2_lm_head.real_rows), N rows (--shape's N; D and V are the model's).
Scenarios: "all_rows" and "half_zero_adv" (half the sequences with advantage 0, like zero-variance
groups; only grpo_cpu is rerun). Each (shape, dtype, variant, scenario, provider) runs in its own
subprocess (memory: Linux VmHWM above the inputs and the two unavoidable gradients, as
bench_logprob_entropy.py; time: median of --reps).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

# this checkout's packages first (not an installed copy), then the benchmark helpers
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import providers  # noqa: E402
from bench_logprob_entropy import fmt, machine, parse_or_serve, time_and_peak  # noqa: E402
from bench_logprob_entropy import measure as measure_in_worker  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCENARIOS = {"all_rows": 0.0, "half_zero_adv": 0.5}
PROVIDERS = ("matmul_3", "matmul_4", "matmul_4_fp32", "lle_cpu", "grpo_torch", "grpo_cpu", "trl_chunked", "liger")
SKIPPING = ("grpo_cpu",)  # rerun in half_zero_adv; the floors are copied, the rest skipped
SEQ = 512  # tokens per sequence
VARIANTS = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=SEQ),
    "dapo": dict(),
    "cispo": dict(loss_type="cispo"),
    "sapo_entropy": dict(loss_type="sapo", entropy_coef=0.01),
    "luspo": dict(loss_type="luspo"),
    "grpo_kl": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    "grpo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
}
LIGER_LACKS = ("sapo_entropy",)  # Liger's GRPO loss has no entropy bonus
MODELS = ("random", "smollm2")


def real_case(n: int, dtype) -> providers.Case:
    """SmolLM2's real final hidden states [n, 576], tied head [49152, 576] and next tokens [n] as a
    providers.Case, built once per n and cached in the temp directory (each provider runs in its own
    process)."""
    cache = Path(tempfile.gettempdir()) / f"prepo-bench-grpo-smollm2-{n}.pt"
    if not cache.exists():
        from bench_smollm2_lm_head import real_rows

        torch.save(real_rows(n), cache)
    hidden, weight, targets = torch.load(cache)
    ones = torch.ones(n)
    return providers.Case(hidden.to(dtype), weight.to(dtype), targets, ones, ones)


def make_inputs(n, d, vocab, dtype, zero_frac, model="random"):
    """Hidden / weight / targets (providers.make_case's, mean entropy about 1.5 nats, or SmolLM2's real
    ones) as [n / SEQ, SEQ] sequences, providers.grpo_inputs' old log-probs (and reference ones, another
    draw) a little off the current ones, and per-sequence advantages, 0 on a ``zero_frac`` share of them."""
    case = real_case(n, dtype) if model == "smollm2" else providers.make_case(n, d, vocab, dtype, 0.0)
    d = case.hidden.shape[1]
    b, t = max(1, n // SEQ), min(n, SEQ)
    old, _ = providers.grpo_inputs(case)
    ref, _ = providers.grpo_inputs(case, seed=2, spread=0.1)
    gen = torch.Generator().manual_seed(1)
    adv = torch.randn(b, 1, generator=gen)
    adv[torch.rand(b, 1, generator=gen) < zero_frac] = 0
    return case.hidden.view(b, t, d), case.weight, case.targets.view(b, t), old.view(b, t), ref.view(b, t), adv, case


def build(name, variant, hidden, weight, targets, old, ref, adv):
    from prepo_kernels import GRPOLossParams, grpo_objective, linear_grpo_loss, linear_logprob_entropy
    from prepo_kernels.grpo_objective import GRPOTokens

    params = GRPOLossParams(**VARIANTS[variant])
    tokens = GRPOTokens(advantages=adv, old_logprob=old, ref_logprob=ref)
    mask = torch.ones(targets.shape, dtype=torch.bool)
    need_entropy = params.entropy_coef != 0

    def two_pass(logprobs):
        def loss_fn(h, w):
            lp, ent = logprobs(h, w)
            return grpo_objective(lp, ent, mask, tokens, params).loss
        return loss_fn

    def lle(h, w):
        return linear_logprob_entropy(h, w, targets, compute_entropy=need_entropy, impl="cpu")

    def trl_chunked(h, w):
        from trl.kernels import ChunkedLogProbFunction

        lp, ent, *_ = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), w, None, targets.reshape(-1), 1.0,
                                                   32768, None, 1.0, ("entropy",) if need_entropy else ())
        return lp.view(targets.shape), None if ent is None else ent.view(targets.shape)

    def liger():
        if variant in LIGER_LACKS:
            raise providers.Unavailable(f"n/a: Liger's GRPO loss has no {variant}")
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(beta=params.beta, compiled=False, use_ref_model=False,
                                          epsilon_low=params.eps_low, epsilon_high=params.eps_high,
                                          loss_type=params.loss_type, importance_sampling_level=params.importance_sampling_level,
                                          use_bias_correction_kl=params.use_bias_correction_kl,
                                          max_completion_length=params.max_completion_length)
        return lambda h, w: module(h, w, targets, mask.long(), adv.view(-1), ref_per_token_logps=ref,
                                   old_per_token_logps=old)[0]

    fns = {"lle_cpu": lambda: two_pass(lle), "trl_chunked": lambda: two_pass(trl_chunked), "liger": liger}
    for impl in ("torch", "cpu"):
        fns[f"grpo_{impl}"] = (lambda impl: lambda: lambda h, w: linear_grpo_loss(
            h, w, targets, old, adv, ref_logprob=ref, params=params, impl=impl)[0])(impl)
    loss_fn = fns[name]()

    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss_fn(h, w).backward()

    return run


def worker(spec: dict) -> dict:
    n, d, vocab = spec["shape"]
    dtype, name = DTYPES[spec["dtype"]], spec["provider"]
    hidden, weight, targets, old, ref, adv, case = make_inputs(n, d, vocab, dtype, SCENARIOS[spec["scenario"]],
                                                               spec["model"])
    d, vocab = case.hidden.shape[1], case.weight.shape[0]
    if name.startswith("matmul_"):
        run = providers.build(name, "fwdbwd", case)
    else:
        tiny = make_inputs(16, d, 128, dtype, 0.0)[:6]
        build(name, spec["variant"], *tiny)()  # library start-up (threads, allocator) is not the design's memory
        run = build(name, spec["variant"], hidden, weight, targets, old, ref, adv)
    return time_and_peak(run, spec["reps"], (n * d + vocab * d) * hidden.element_size())


def measure(spec: dict) -> dict:
    return measure_in_worker(spec, __file__)


# x_matmul_4: over matmul_4, or over matmul_4_fp32 where matmul_4 was not run
COLUMNS = ["shape", "dtype", "variant", "scenario", "provider", "median_ms", "x_matmul_4", "x_lle_cpu", "extra_mb",
           "mem_vs_lle_cpu", "error"]


def add_ratios(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["shape"], row["dtype"], row["variant"], row["scenario"]), {})[row["provider"]] = row
    for group in groups.values():
        for row in group.values():
            for bases, col in ((("matmul_4", "matmul_4_fp32"), "x_matmul_4"), (("lle_cpu",), "x_lle_cpu")):
                base = next((group[b] for b in bases if "median_ms" in group.get(b, {})), None)
                if "median_ms" in row and base is not None:
                    row[col] = row["median_ms"] / base["median_ms"]
            if "extra_mb" in row and group.get("lle_cpu", {}).get("extra_mb") and not row["provider"].startswith("m"):
                row["mem_vs_lle_cpu"] = row["extra_mb"] / group["lle_cpu"]["extra_mb"]


def write(rows, out: Path, header: str, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x1024x32768", help="NxDxV")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--model", choices=MODELS, default="random",
                        help="random inputs of --shape, or SmolLM2's real head and hidden states (N rows)")
    parser.add_argument("--skip-bf16-floors", action="store_true",
                        help="do not time matmul_3 / matmul_4 in bf16 (minutes each on a CPU without bf16 GEMMs)")
    args = parse_or_serve(parser, worker, "grpo_loss_cpu_4096x1024x32768")
    if args is None:
        return
    if args.quick:
        args.shape, args.reps, args.name = "1024x64x2000", 1, "grpo_loss_quick"
        args.dtypes, args.variants = "fp32", "dapo,grpo_sequence"  # one of each path: a smoke test
    command = "python benchmarks/bench_grpo_loss.py " + " ".join(sys.argv[1:])
    header = (f"Machine: {machine()}. Command: `{command.strip()}`. Median of {args.reps} calls, ms; "
              "extra_mb: peak RSS above the inputs and the hidden / weight gradients. The floors do not depend "
              "on the variant or the scenario: measured once per dtype, copied to the other groups.")
    print(header, flush=True)
    dims = [int(x) for x in args.shape.split("x")]
    if args.model == "smollm2":
        dims[1:] = [576, 49152]
        args.shape = "x".join(map(str, dims)) + " (SmolLM2)"
    rows, floors = [], {}
    for dtype in args.dtypes.split(","):
        for variant in args.variants.split(","):
            for scenario in args.scenarios.split(","):
                for name in args.providers.split(","):
                    row = measured_row(args, dims, dtype, variant, scenario, name, floors)
                    if row is None:
                        continue
                    rows.append(row)
                    print(" ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "times_ms"), flush=True)
                    add_ratios(rows)
                    write(rows, args.out, header, args.name)
    print(f"wrote {args.out}/{args.name}.md")


def measured_row(args, dims, dtype, variant, scenario, name, floors):
    """One result row, or None where the group does not run ``name`` (only the row-skipping
    provider is rerun in half_zero_adv; matmul_4_fp32 is for bf16)."""
    row = {"shape": args.shape, "dtype": dtype, "variant": variant, "scenario": scenario, "provider": name}
    floor_key = ("fp32" if name == "matmul_4_fp32" else dtype, "matmul_4" if name == "matmul_4_fp32" else name)
    if name == "matmul_4_fp32" and dtype == "fp32":
        return None
    if name.startswith("matmul_"):
        if args.skip_bf16_floors and dtype == "bf16" and name in ("matmul_3", "matmul_4"):
            row["error"] = "skipped (--skip-bf16-floors): ATen's bf16 matmul is the slow path here"
            return row
        if floor_key not in floors:
            spec = {"shape": dims, "dtype": floor_key[0], "scenario": "all_rows", "variant": variant,
                    "provider": floor_key[1], "reps": args.reps, "model": args.model}
            floors[floor_key] = measure(spec)
        row.update({k: v for k, v in floors[floor_key].items() if k in ("median_ms", "extra_mb", "error")})
        return row
    if scenario != "all_rows" and name not in SKIPPING:
        return None
    row.update(measure({"shape": dims, "dtype": dtype, "variant": variant, "scenario": scenario, "provider": name,
                        "reps": args.reps, "model": args.model}))
    return row


if __name__ == "__main__":
    main()
