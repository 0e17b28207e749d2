#!/usr/bin/env python
"""The fused log-prob + entropy benchmarks on a GPU, against the peers.

    python benchmarks/gpu_suite.py                 # default shapes
    python benchmarks/gpu_suite.py --shapes 8192,4096,131072
    python benchmarks/gpu_suite.py --dry-run       # no CUDA needed: tiny CPU shapes, plumbing only

The native extension's "cuda" backend is measured when prepo_kernels._C is built for this GPU
(``tools/gpu_all.py`` builds it, runs the GPU tests, then this suite, inside one time budget).

What is measured, for each (N, D, V) in bf16 and each scenario
    all   every row has an upstream gradient (advantage-like randn for the log-prob and the entropy)
    grpo  GRPO-like: about half the rows (whole blocks of 64) have zero upstream gradient
and each implementation (benchmarks/providers.py's names; skipped, with the reason printed, when not
installed / unavailable):
    prepo_triton      prepo_kernels.linear_logprob_entropy(impl="triton")
    prepo_cuda        impl="cuda"
    prepo_torch       impl="torch" (chunked pure PyTorch)
    naive             bf16 matmul -> fp32 log_softmax -> gather, entropy = -sum p log p
    naive_compiled    torch.compile(naive)
    torch_linear_ce   torch.nn.functional.linear_cross_entropy(reduction="none")  (logprob only)
    liger             Liger Kernel: LigerFusedLinearScaledCrossEntropyFunction(return_entropy=True),
                      or LigerFusedLinearCrossEntropyFunction(reduction="none") (logprob only) on
                      versions without it
    cce               cut_cross_entropy.linear_cross_entropy(reduction="none")  (logprob only)
  plus a bare bf16 GEMM h @ W.T ([N, V] output) as the yardstick.
Columns: median ms (torch.cuda.Event), TFLOP/s counted as 2NDV (fwd) or 6NDV (fwd+bwd) whatever the
implementation skips, % of the measured GEMM rate, peak memory (torch.cuda.max_memory_allocated,
absolute and above the inputs), max |logprob - fp32 logits reference|. The inputs are
benchmarks/providers.py's make_case: weights scaled so the mean token entropy is about --entropy
nats, targets sampled from the model's own distribution.
Writes CSV + markdown to benchmarks/results/gpu_suite_<gpu>_<time>.{csv,md} (--out-dir, --basename),
rewritten after every row.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = "8192,4096,131072;8192,4096,151936"
DRY_SHAPES = "64,32,300"
# benchmarks/providers.py's peer names (prepo_cpu is the CPU backend, not measured on a GPU)
ALL_IMPLS = ("prepo_triton", "prepo_cuda", "prepo_torch", "naive", "naive_compiled", "torch_linear_ce", "liger", "cce")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--shapes", default=None,
                   help=f"';'-separated N,D,V triples (default {DEFAULT_SHAPES}; dry-run {DRY_SHAPES})")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--impls", default=",".join(ALL_IMPLS), help="comma-separated subset of " + ",".join(ALL_IMPLS))
    p.add_argument("--scenarios", default="all,grpo", help="comma-separated subset of all,grpo")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--entropy", type=float, default=1.5, help="target mean token entropy in nats (default 1.5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--deterministic", action="store_true", help="prepo backends in deterministic mode")
    p.add_argument("--no-grad-filter", action="store_true", help="prepo backends without the bf16/fp16 gradient filter")
    p.add_argument("--out-dir", default=None,
                   help="where CSV/markdown go (default benchmarks/results; dry-run: a temporary directory)")
    p.add_argument("--basename", default=None,
                   help="file name (no suffix) of the CSV/markdown (default gpu_suite_<gpu>_<time>)")
    p.add_argument("--dry-run", action="store_true",
                   help="no CUDA needed: run the harness on tiny CPU shapes (triton via TRITON_INTERPRET=1), "
                        "without torch.compile")
    return p.parse_args(argv)


def load_providers():
    """benchmarks/providers.py (the inputs and the peers, one name each); imported when the suite
    runs, after --dry-run has set TRITON_INTERPRET."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import providers

    return providers


# --------------------------------------------------------------------------------------------------
# timing

class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], object], warmup: int, iters: int) -> float:
        import torch

        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_bytes(self, fn: Callable[[], object]) -> tuple[Optional[int], Optional[int]]:
        """(absolute peak, peak above what was allocated before) for one call; None on CPU."""
        import torch

        if self.device.type != "cuda":
            fn()
            return None, None
        self.sync()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak, peak - base


# --------------------------------------------------------------------------------------------------

@dataclass
class Row:
    shape: str
    scenario: str
    mode: str
    impl: str
    computes: str = ""
    ms: Optional[float] = None
    tflops: Optional[float] = None
    pct_gemm: Optional[float] = None
    peak_gib: Optional[float] = None
    extra_gib: Optional[float] = None
    max_dlogprob: Optional[float] = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


COLUMNS = ("shape", "scenario", "mode", "impl", "computes", "ms", "tflops", "pct_gemm", "peak_gib", "extra_gib",
           "max_dlogprob", "status")


def fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def gpu_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-dry-run"


@dataclass
class Suite:
    """What every measurement of one run shares."""

    args: argparse.Namespace
    device: object
    dtype: object
    timer: Timer
    providers: object
    params: object
    base: Path  # output files, without the suffix
    name: str  # the GPU's name
    header: list  # markdown lines above the table
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def output_base(args, name: str, stamp: str) -> Path:
    """Where the CSV/markdown go, without the suffix."""
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.dry_run:
        out_dir = Path(tempfile.mkdtemp(prefix="gpu_suite_dryrun_"))
    else:
        out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / (args.basename or f"gpu_suite_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}_{stamp}")


def _row_step(fn, h, w, y, g, e, mode: str):
    """The callable timed for one row: a no-grad forward, or forward + backward of sum(g lp + e H)."""
    import torch

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(h, w, y)
        return step
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()

    def step():
        hh.grad = ww.grad = None
        lp, ent = fn(hh, ww, y)
        loss = (lp.float() * g).sum()
        if ent is not None:
            loss = loss + (ent.float() * e).sum()
        loss.backward()
    return step


def measure_row(suite: Suite, row: Row, step, flop: float, gemm_tflops: float, ref_lp) -> None:
    """Fill ``row`` with the median time, TFLOP/s, % of the GEMM rate, peak memory and (forward)
    the log-prob error; an OOM or an exception becomes the row's status."""
    import torch

    try:
        if row.mode == "fwd":
            lp, _ = step()
            row.max_dlogprob = float((lp.float() - ref_lp).abs().max())
            del lp
        row.ms = suite.timer.median_ms(step, suite.args.warmup, suite.args.iters)
        row.tflops = flop / row.ms / 1e9
        row.pct_gemm = 100.0 * row.tflops / gemm_tflops
        peak, extra = suite.timer.peak_bytes(step)
        row.peak_gib = None if peak is None else peak / 2**30
        row.extra_gib = None if extra is None else extra / 2**30
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
    except Exception as exc:  # noqa: BLE001
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        traceback.print_exc()
    finally:
        _free(suite.device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _make_provider(suite: Suite, impl: str):
    """(fn, computes), or None after noting why ``impl`` is skipped."""
    try:
        return suite.providers.make(impl, suite.device, suite.params)
    except Exception as exc:  # noqa: BLE001 -- providers.Unavailable or a peer that breaks on import
        why = str(exc) if isinstance(exc, suite.providers.Unavailable) else f"{type(exc).__name__}: {exc}"
        msg = f"{impl}: skipped: {why}"
        print("   " + msg, flush=True)
        if msg not in suite.notes:
            suite.notes.append(msg)
        return None


def bench_shape(suite: Suite, N: int, D: int, V: int) -> None:
    """The GEMM yardstick, then every (impl, scenario, mode) row at one shape; the files are rewritten
    after every row, so a run stopped part-way keeps what it measured."""
    import torch

    args, shape = suite.args, f"{N}x{D}x{V}"
    print(f"\n== shape N={N} D={D} V={V} {args.dtype}", flush=True)
    case = suite.providers.make_case(N, D, V, suite.dtype, 0.0, device=suite.device, target_entropy=args.entropy,
                                     sample_targets=True)
    h, w, y, g_all, e_all, ref_lp = (case.hidden, case.weight, case.targets, case.grad_logprob, case.grad_entropy,
                                     case.ref_logprob)
    suite.header.append(f"- {shape}: mean token entropy {case.mean_entropy:.3f} nats (targets sampled from the model)")
    print(f"   mean token entropy {case.mean_entropy:.3f} nats", flush=True)
    fwd_flop, fb_flop = 2.0 * N * D * V, 6.0 * N * D * V
    gemm_ms = suite.timer.median_ms(lambda: h @ w.T, args.warmup, args.iters)
    gemm_tflops = fwd_flop / gemm_ms / 1e9
    peak, extra = suite.timer.peak_bytes(lambda: h @ w.T)
    suite.rows.append(Row(shape, "-", "gemm", "bf16-gemm" if suite.dtype == torch.bfloat16 else f"{args.dtype}-gemm",
                          "h @ W.T", gemm_ms, gemm_tflops, 100.0,
                          None if peak is None else peak / 2**30, None if extra is None else extra / 2**30))
    write_report(suite)
    print(f"   GEMM {gemm_ms:.3f} ms, {gemm_tflops:.1f} TFLOP/s", flush=True)
    scenarios, modes = _split(args.scenarios), _split(args.modes)
    for impl in _split(args.impls):
        made = _make_provider(suite, impl)
        if made is None:
            continue
        fn, computes = made
        for scenario in scenarios:
            zero = None if scenario != "grpo" else suite.providers.zero_blocks(
                N, 0.5, torch.Generator(device=suite.device).manual_seed(1))
            g = g_all if zero is None else g_all.masked_fill(zero, 0.0)
            e = e_all if zero is None else e_all.masked_fill(zero, 0.0)
            for mode in modes:
                if mode == "fwd" and scenario != scenarios[0]:
                    continue  # forward does not depend on the upstream gradient
                row = Row(shape, scenario if mode != "fwd" else "-", mode, impl, computes)
                measure_row(suite, row, _row_step(fn, h, w, y, g, e, mode),
                            fwd_flop if mode == "fwd" else fb_flop, gemm_tflops, ref_lp)
                suite.rows.append(row)
                write_report(suite)
                print(f"   {impl:15s} {mode:8s} {row.scenario:5s} " + (
                    f"{row.ms:9.3f} ms {row.tflops:7.1f} TFLOP/s {row.pct_gemm:5.1f}% gemm"
                    + (f" peak {row.peak_gib:.2f} GiB" if row.peak_gib is not None else "")
                    if row.ms is not None else row.status), flush=True)
    del case, h, w, y, g_all, e_all, ref_lp
    _free(suite.device)


def write_report(suite: Suite) -> list:
    """Write the CSV and the markdown table; returns the markdown lines."""
    base, name, header = suite.base, suite.name, suite.header
    csv_path, md_path = base.with_suffix(".csv"), base.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        wtr = csv.writer(f)
        wtr.writerow(["gpu", *COLUMNS])
        for r in suite.rows:
            wtr.writerow([name, *(fmt(getattr(r, c)) for c in COLUMNS)])
    titles = ("shape", "scenario", "mode", "impl", "computes", "ms (median)", "TFLOP/s", "% GEMM", "peak GiB",
              "GiB above inputs", "max abs dlogprob vs fp32", "status")
    lines = header + ["", "TFLOP/s counts 2NDV (fwd) / 6NDV (fwd+bwd) for every implementation, whatever it "
                      "computes or skips (in `grpo` half the rows have zero gradient: prepo's autograd layer drops "
                      "those rows before its backward kernels, the peers compute them).", "",
                      "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(fmt(getattr(r, c)) for c in COLUMNS) + " |" for r in suite.rows]
    if suite.notes:
        lines += ["", "Skipped:", ""] + [f"- {n}" for n in suite.notes]
    md_path.write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before prepo_kernels (and so triton) is imported
    sys.path.insert(0, str(REPO))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA device is available (torch.cuda.is_available() is False). "
              "Run it on a GPU machine, or use --dry-run to smoke-test the harness on CPU.", file=sys.stderr)
        return 2
    bad = [i for i in _split(args.impls) if i not in ALL_IMPLS]
    if bad:
        print(f"unknown impl(s) {bad}; choose from {ALL_IMPLS}", file=sys.stderr)
        return 2
    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shapes or (DRY_SHAPES if args.dry_run else DEFAULT_SHAPES)).split(";") if s.strip()]
    if args.dry_run:
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from prepo_kernels import KernelParams

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = gpu_name(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    header = [f"# gpu_suite: {name}", "",
              f"- date (UTC): {stamp}", f"- torch {torch.__version__}, triton {triton_version}, "
              f"CUDA {torch.version.cuda}", f"- dtype {args.dtype}, warmup {args.warmup}, iters {args.iters}, "
              f"deterministic={args.deterministic}, grad_filter={not args.no_grad_filter}"]
    suite = Suite(args, device, dtype, Timer(device), load_providers(),
                  KernelParams(deterministic=args.deterministic, grad_filter=not args.no_grad_filter),
                  output_base(args, name, stamp), name, header)
    for (N, D, V) in shapes:
        bench_shape(suite, N, D, V)
    print("\n" + "\n".join(write_report(suite)))
    print(f"\nwrote {suite.base.with_suffix('.csv')}\nwrote {suite.base.with_suffix('.md')}")
    failed = any(r.status.startswith("error") for r in suite.rows if r.impl.startswith("prepo"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
