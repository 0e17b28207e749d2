"""Benchmark fused log-prob + entropy against the bare matmuls and peer implementations (CPU).

    python benchmarks/bench_logprob_entropy.py            # full run, writes benchmarks/results/
    python benchmarks/bench_logprob_entropy.py --quick    # tiny shapes, a smoke test

Each (shape, dtype, scenario, provider) runs in its own subprocess: one untimed call measures the
extra peak memory (Linux VmHWM after resetting it, minus the inputs and the unavoidable gradient
outputs), then ``--reps`` timed calls give the median. Ratios compare providers measured in the
same run on the same machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import providers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCENARIOS = {  # name -> (mode, fraction of rows with zero upstream gradient)
    "fwd": ("fwd", 0.0),
    "fwdbwd": ("fwdbwd", 0.0),
    "fwdbwd_grpo": ("fwdbwd", 0.5),
}
FULL_SHAPES = "4096x1024x32768,2048x896x151936"
QUICK_SHAPES = "256x64x2000"
RESULTS = Path(__file__).resolve().parent / "results"


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(spec: dict) -> dict:
    """Runs in a subprocess: one memory-measuring call, then timed calls."""
    n, d, vocab = spec["shape"]
    dtype = DTYPES[spec["dtype"]]
    mode, zero_frac = SCENARIOS[spec["scenario"]]
    # a tiny call first, so library start-up (threads, compilation) is not counted as the design's memory
    providers.build(spec["provider"], mode, providers.make_case(16, d, 128, dtype, zero_frac))()
    case = providers.make_case(n, d, vocab, dtype, zero_frac)
    run = providers.build(spec["provider"], mode, case)
    unavoidable = (n * d + vocab * d) * case.hidden.element_size() if mode == "fwdbwd" else 0
    return time_and_peak(run, spec["reps"], unavoidable)


def time_and_peak(run, reps: int, unavoidable_bytes: int) -> dict:
    """Peak RSS above the current one of one ``run()`` (less ``unavoidable_bytes``, the inputs'
    gradients), then the median of ``reps`` more calls, in ms."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    base_kb = _status_kb("VmRSS")
    run()
    peak_bytes = (_status_kb("VmHWM") - base_kb) * 1024
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times],
            "extra_mb": max(0, peak_bytes - unavoidable_bytes) / 2**20}


def measure(spec: dict, script: str = __file__) -> dict:
    """Run ``script --worker spec`` in a fresh process (a clean peak-RSS mark); its last stdout line."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# Peers have no zero-gradient row skipping, so the GRPO-like scenario costs them what the every-row
# one does; it is run for naive (as the yardstick) and the prepo backends, and the floors (which do
# not depend on the scenario) are copied from the every-row group rather than measured twice.
GRPO_PROVIDERS = ("naive", "prepo_torch", "prepo_cpu")


def provider_names(scenario: str, wanted: list[str] | None) -> list[str]:
    names = list(providers.FLOORS[SCENARIOS[scenario][0]]) + list(providers.FUSED)
    if scenario == "fwdbwd_grpo":
        names = [n for n in names if n in GRPO_PROVIDERS or n.startswith("matmul_")]
    return [n for n in names if wanted is None or n in wanted or n.startswith("matmul_")]


def floor_copy(rows: list[dict], shape: str, dtype: str, scenario: str, name: str) -> dict | None:
    """The every-row measurement of a floor, reused for the GRPO-like group."""
    if scenario != "fwdbwd_grpo" or not name.startswith("matmul_"):
        return None
    for row in rows:
        if (row["shape"], row["dtype"], row["scenario"], row["provider"]) == (shape, dtype, "fwdbwd", name):
            return {k: v for k, v in row.items() if k in ("median_ms", "times_ms", "extra_mb")}
    return None


def add_ratios(rows: list[dict]) -> None:
    """Ratio of each median to the floors and of each extra memory to naive's, within a group."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["dtype"], row["scenario"]), {})[row["provider"]] = row
    for group in groups.values():
        naive_mb = group.get("naive", {}).get("extra_mb")
        for row in group.values():
            if "median_ms" not in row:
                continue
            for floor in ("matmul_1", "matmul_3", "matmul_4"):
                if floor in group and "median_ms" in group[floor]:
                    row[f"x_{floor}"] = row["median_ms"] / group[floor]["median_ms"]
            if naive_mb and not row["provider"].startswith("matmul_"):
                row["mem_vs_naive"] = row["extra_mb"] / naive_mb


COLUMNS = ["shape", "dtype", "scenario", "provider", "median_ms", "x_matmul_1", "x_matmul_3", "x_matmul_4",
           "extra_mb", "mem_vs_naive", "error"]


def fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write(rows: list[dict], out: Path, header: str, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def parse_or_serve(parser: argparse.ArgumentParser, worker_fn, name: str) -> Optional[argparse.Namespace]:
    """Adds the options both CPU kernel benchmarks share (--reps, --out, --name defaulting to
    ``name``, --quick, and --worker, the launcher's own), parses the command line and returns it;
    or, called as a worker (:func:`measure`), prints ``worker_fn``'s JSON answer and returns None."""
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=name, help="file stem of the results")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 rep: a smoke test, not a result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_fn(json.loads(args.worker))))
        return None
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=FULL_SHAPES, help="comma-separated NxDxV")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--providers", default=None, help="comma-separated fused providers (floors always run)")
    args = parse_or_serve(parser, worker, "logprob_entropy_cpu")
    if args is None:
        return
    if args.quick:
        args.shapes, args.reps = QUICK_SHAPES, 1
    wanted = args.providers.split(",") if args.providers else None
    command = "python benchmarks/bench_logprob_entropy.py " + " ".join(sys.argv[1:])
    header = f"Machine: {machine()}. Command: `{command.strip()}`. Median of {args.reps} calls, ms."
    print(header, flush=True)
    rows = []
    for shape in args.shapes.split(","):
        dims = [int(x) for x in shape.split("x")]
        for dtype in args.dtypes.split(","):
            for scenario in args.scenarios.split(","):
                for name in provider_names(scenario, wanted):
                    row = {"shape": shape, "dtype": dtype, "scenario": scenario, "provider": name}
                    why = providers.unavailable(name)
                    copied = floor_copy(rows, shape, dtype, scenario, name)
                    if why:
                        row["error"] = f"skipped: {why}"
                    elif copied:
                        row.update(copied)
                    else:
                        row.update(measure({"shape": dims, "dtype": dtype, "scenario": scenario,
                                            "provider": name, "reps": args.reps}))
                    rows.append(row)
                    print(" ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "times_ms"), flush=True)
                    add_ratios(rows)
                    write(rows, args.out, header, args.name)
    add_ratios(rows)
    write(rows, args.out, header, args.name)
    print(f"wrote {args.out}/{args.name}.csv and .md")


if __name__ == "__main__":
    main()
