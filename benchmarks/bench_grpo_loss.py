"""Benchmark the fused linear GRPO loss (forward + backward) against the bare matmuls and the
present path, linear_logprob_entropy forward + backward followed by prepo.loss.grpo_loss (CPU).

    flock /tmp/prepo-bench.lock python benchmarks/bench_grpo_loss.py    # full run, writes benchmarks/results/
    python benchmarks/bench_grpo_loss.py --quick                        # tiny shapes, a smoke test

Providers (each computes loss.backward() of the DAPO token-mean loss w.r.t. hidden and weight):
    matmul_3 / matmul_4   the three / four bare [N, D] x [D, V] matmuls in the inputs' dtype (the floors)
    matmul_4_fp32         matmul_4 on fp32 copies of bf16 inputs: on CPUs without native bf16 GEMMs
                          (AVX2) ATen's bf16 matmul is several times slower than fp32, so this is
                          the floor a bf16 design can actually reach there
    naive                 materialized logits, log_softmax, grpo_loss, torch autograd
    lle_cpu / lle_torch   linear_logprob_entropy(impl=..., compute_entropy=False) + grpo_loss
    grpo_cpu / grpo_torch linear_grpo_loss(impl=...)
Scenarios: "all_rows" (every advantage non-zero) and "half_zero_adv" (blocks of 64 rows, about
half, with advantage 0, like zero-variance groups; only the row-skipping providers are rerun).
Each (shape, dtype, scenario, provider) runs in its own subprocess (memory: Linux VmHWM above the
inputs and the two unavoidable gradients, as bench_logprob_entropy.py; time: median of --reps).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# this checkout's packages first (not an installed copy), then the benchmark helpers
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import providers  # noqa: E402
from bench_logprob_entropy import fmt, machine, parse_or_serve, time_and_peak  # noqa: E402
from bench_logprob_entropy import measure as measure_in_worker  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCENARIOS = {"all_rows": 0.0, "half_zero_adv": 0.5}
PROVIDERS = ("matmul_3", "matmul_4", "matmul_4_fp32", "naive", "lle_torch", "lle_cpu", "grpo_torch", "grpo_cpu")
SKIPPING = ("lle_cpu", "grpo_cpu")  # rerun in half_zero_adv; the floors are copied, the rest skipped
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_inputs(n, d, vocab, dtype, zero_frac):
    """providers.make_case's hidden / weight / targets (mean entropy about 1.5 nats) and
    providers.grpo_inputs' old log-probs and advantages (0 on the rows make_case gives no gradient)."""
    case = providers.make_case(n, d, vocab, dtype, zero_frac)
    old, adv = providers.grpo_inputs(case)
    return case.hidden, case.weight, case.targets, old, adv, case


def build(name, hidden, weight, targets, old, adv):
    from prepo.loss import grpo_loss
    from prepo_kernels import linear_grpo_loss, linear_logprob_entropy

    mask = torch.ones(targets.shape[0], 1, dtype=torch.bool)

    def present(impl):
        def loss_fn(h, w):
            if impl == "naive":
                lp = torch.log_softmax((h @ w.T).float(), -1).gather(1, targets[:, None])
            else:
                lp = linear_logprob_entropy(h, w, targets, compute_entropy=False, impl=impl)[0][:, None]
            return grpo_loss(lp, old[:, None], adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH).loss
        return loss_fn

    fns = {"naive": present("naive"), "lle_torch": present("torch"), "lle_cpu": present("cpu")}
    for impl in ("torch", "cpu"):
        fns[f"grpo_{impl}"] = (lambda impl: lambda h, w: linear_grpo_loss(
            h, w, targets, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, impl=impl)[0])(impl)
    loss_fn = fns[name]

    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss_fn(h, w).backward()

    return run


def worker(spec: dict) -> dict:
    n, d, vocab = spec["shape"]
    dtype, name = DTYPES[spec["dtype"]], spec["provider"]
    hidden, weight, targets, old, adv, case = make_inputs(n, d, vocab, dtype, SCENARIOS[spec["scenario"]])
    if name == "matmul_4_fp32":
        case.hidden, case.weight = case.hidden.float(), case.weight.float()
        run = providers.build("matmul_4", "fwdbwd", case)
    elif name.startswith("matmul_"):
        run = providers.build(name, "fwdbwd", case)
    else:
        tiny = make_inputs(16, d, 128, dtype, 0.0)[:5]
        build(name, *tiny)()  # library start-up (threads, allocator) is not the design's memory
        run = build(name, hidden, weight, targets, old, adv)
    return time_and_peak(run, spec["reps"], (n * d + vocab * d) * hidden.element_size())


def measure(spec: dict) -> dict:
    return measure_in_worker(spec, __file__)


# x_matmul_4: over matmul_4, or over matmul_4_fp32 where matmul_4 was not run
COLUMNS = ["shape", "dtype", "scenario", "provider", "median_ms", "x_matmul_4", "x_lle_cpu", "extra_mb",
           "mem_vs_lle_cpu", "error"]


def add_ratios(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["shape"], row["dtype"], row["scenario"]), {})[row["provider"]] = row
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
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--skip-bf16-floors", action="store_true",
                        help="do not time matmul_3 / matmul_4 in bf16 (minutes each on a CPU without bf16 GEMMs)")
    args = parse_or_serve(parser, worker, "grpo_loss_cpu_4096x1024x32768")
    if args is None:
        return
    if args.quick:
        args.shape, args.reps, args.name = "256x64x2000", 1, "grpo_loss_quick"
    command = "python benchmarks/bench_grpo_loss.py " + " ".join(sys.argv[1:])
    header = (f"Machine: {machine()}. Command: `{command.strip()}`. Median of {args.reps} calls, ms; "
              "extra_mb: peak RSS above the inputs and the hidden / weight gradients.")
    print(header, flush=True)
    dims = [int(x) for x in args.shape.split("x")]
    rows = []
    for dtype in args.dtypes.split(","):
        for scenario in args.scenarios.split(","):
            for name in args.providers.split(","):
                row = {"shape": args.shape, "dtype": dtype, "scenario": scenario, "provider": name}
                if name == "matmul_4_fp32" and dtype == "fp32":
                    continue
                fp32_floor = next((r for r in rows if (r["dtype"], r["scenario"], r["provider"]) ==
                                   ("fp32", scenario, "matmul_4") and "median_ms" in r), None)
                if name == "matmul_4_fp32" and fp32_floor is not None:  # the very same fp32 GEMMs
                    row.update(median_ms=fp32_floor["median_ms"], extra_mb=fp32_floor["extra_mb"],
                               error="copied from the fp32 matmul_4 row (the same fp32 GEMMs)")
                    rows.append(row)
                    continue
                if args.skip_bf16_floors and dtype == "bf16" and name in ("matmul_3", "matmul_4"):
                    row["error"] = "skipped (--skip-bf16-floors): ATen's bf16 matmul is the slow path here"
                elif scenario != "all_rows" and name not in SKIPPING:
                    if not name.startswith("matmul_"):
                        continue
                    copied = next((r for r in rows if (r["dtype"], r["scenario"], r["provider"]) ==
                                   (dtype, "all_rows", name)), None)
                    if copied is None:
                        continue
                    row.update({k: copied[k] for k in ("median_ms", "extra_mb") if k in copied})
                else:
                    row.update(measure({"shape": dims, "dtype": dtype, "scenario": scenario, "provider": name,
                                        "reps": args.reps}))
                rows.append(row)
                print(" ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "times_ms"), flush=True)
                add_ratios(rows)
                write(rows, args.out, header, args.name)
    print(f"wrote {args.out}/{args.name}.md")


if __name__ == "__main__":
    main()
