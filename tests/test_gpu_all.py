"""tools/gpu_all.py, the one script a lent GPU runs: its pieces, and a whole dry run on the CPU
(Triton interpreted, tiny shapes) that must write every table, so that the script itself is not what
breaks when a GPU is finally lent."""
import csv
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_all.py"
_spec = importlib.util.spec_from_file_location("gpu_all", SCRIPT)
gpu_all = sys.modules["gpu_all"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(gpu_all)

TABLES = {"summary.md", "env.csv", "tests.csv", "suite.csv", "suite.md", "grpo_loss.csv", "rl.csv", "gpu_all.log"}
# what the device tool brings back from $OUT: plain files named in letters, digits, '.', '_', '-'
RETURNABLE = re.compile(r"^[A-Za-z0-9._-]+$")


def test_parse_pytest_reads_verbose_and_summary_lines():
    text = """collecting ... collected 5 items
tests/test_a.py::test_x[cuda-torch.float32-False-(6, 8, 300)] PASSED     [ 20%]
tests/test_a.py::test_y[cuda] FAILED                                     [ 40%]
tests/test_a.py::test_z[True-cuda] SKIPPED (needs...)                    [ 60%]
=========================== short test summary info ============================
SKIPPED tests/test_a.py::test_z[True-cuda] - Skipped: needs a CUDA device
FAILED tests/test_a.py::test_y[cuda] - AssertionError: triton logprob: max excess 0.5
ERROR tests/test_b.py - ImportError: no module named trl
"""
    rows = {r["test"]: r for r in gpu_all.parse_pytest(text, "tests_cuda")}
    assert rows["tests/test_a.py::test_x[cuda-torch.float32-False-(6, 8, 300)]"]["outcome"] == "passed"
    assert rows["tests/test_a.py::test_y[cuda]"] == {
        "part": "tests_cuda", "test": "tests/test_a.py::test_y[cuda]", "outcome": "failed",
        "message": "AssertionError: triton logprob: max excess 0.5"}
    assert rows["tests/test_a.py::test_z[True-cuda]"]["message"] == "Skipped: needs a CUDA device"
    assert rows["tests/test_b.py"]["outcome"] == "error"  # a collection error is a row of its own
    assert len(rows) == 4
    # a run killed before its summary still gives the tests it reported
    assert [r["outcome"] for r in gpu_all.parse_pytest(text.split("=====")[0], "p")] == ["passed", "failed", "skipped"]


def test_select_wheels_keeps_what_fits_in_order():
    mib = 2**20
    kept, dropped = gpu_all.select_wheels({"a.whl": 10 * mib, "big.whl": 93 * mib, "b.whl": 20 * mib}, 40 * mib)
    assert kept == ["a.whl", "b.whl"]
    assert [name for name, _ in dropped] == ["big.whl"] and "over 64 MiB" in dropped[0][1]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: gone, or a zombie (killed, not yet reaped), is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_finish_kills_the_whole_process_group_at_the_deadline():
    # a child that starts a grandchild and waits: both must be gone after the deadline
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    grandchild = int(proc.stdout.readline())
    t = time.monotonic()
    status, rc = gpu_all.finish(proc, 0.5)
    assert rc is None and status.startswith("overran") and time.monotonic() - t < 10
    deadline = time.monotonic() + 30   # the orphan dies at once; its reaping (by PID 1) may lag on a loaded machine
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    proc.stdout.close()
    assert gpu_all.finish(subprocess.Popen(["true"], start_new_session=True), 10) == ("ok", 0)


@pytest.mark.slow
def test_gpu_test_files_hold_every_gpu_test():
    """`pytest -m gpu` over test_files() collects exactly what it collects over the whole folder."""
    def collected(paths):
        out = subprocess.run([sys.executable, "-m", "pytest", *paths, "-m", "gpu", "--collect-only", "-q",
                              "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True).stdout
        return {line for line in out.splitlines() if "::" in line}

    mine = collected(gpu_all.test_files(dry_run=False))
    assert mine and mine == collected(["tests"])


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        gpu_all.parse_args(["--parts", "suite,nope"])
    with pytest.raises(SystemExit):
        gpu_all.parse_args(["--budget-s", "3"])
    assert gpu_all.parse_args(["--parts", "suite, rl"]).parts == ["suite", "rl"]


def _dry_run(tmp_path, *extra):
    """The script's dry run into ``tmp_path``; its temporary files go to a folder of their own, which must be
    empty afterwards (a leaked RL work folder once left 1.6 GB per run in /tmp and filled CI's disk)."""
    scratch = tmp_path.with_name(tmp_path.name + "-tmp")
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "TMPDIR": str(scratch)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("gpu_all")], "temporary work left behind"
    return proc


def _table(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["gpu"] == "cpu-dry-run" for r in rows), path.name
    return rows


@pytest.mark.slow
def test_dry_run_writes_every_table(tmp_path):
    """Every part on the CPU (about 4 minutes on a loaded 2-core machine): all tables written under
    names the device tool returns, each part finished."""
    _dry_run(tmp_path, "--budget-s", "600")
    files = set(os.listdir(tmp_path))
    assert files == TABLES and all(RETURNABLE.match(f) for f in files)
    summary = (tmp_path / "summary.md").read_text()
    parts = dict(re.findall(r"^\| (\w+) \| (.+?) \| [\d.]+ \|$", summary, re.M))
    assert set(parts) == {"env", *gpu_all.PARTS}
    assert not [p for p, s in parts.items() if re.match(r"overran|failed|skipped|aborted|FAILED", s)], parts
    env = {r["key"]: r["value"] for r in _table(tmp_path / "env.csv")}
    assert {"torch", "triton", "nvcc", "extension build", "available_impls"} <= set(env)
    tests = _table(tmp_path / "tests.csv")
    assert {r["part"] for r in tests} == {"tests_triton", "tests_cuda"}
    if not torch.cuda.is_available():  # -m gpu on a CPU: every test skipped, saying why
        assert all(r["outcome"] == "skipped" and "CUDA" in r["message"] for r in tests)
    suite = _table(tmp_path / "suite.csv")
    assert {"bf16-gemm", "prepo_triton", "prepo_torch", "naive"} <= {r["impl"] for r in suite}
    assert all(r["ms"] for r in suite if r["impl"] == "prepo_triton" and r["status"] == "ok")
    grpo = _table(tmp_path / "grpo_loss.csv")
    assert all(r["status"] == "ok" or r["status"].startswith("not available") for r in grpo)
    assert [r for r in grpo if r["impl"] in ("torch", "reference") and r["status"] == "ok"]   # it ran here
    rl = _table(tmp_path / "rl.csv")
    assert rl[0]["model"] == "smollm2-135m-instruct"
    assert [r["step"] for r in rl if r["model"] == "tiny_qwen2" and r["status"] == "ok"] == ["1", "2"]
    assert "## RL steps" in summary and "## Fused log-prob + entropy" in summary


@pytest.mark.slow
def test_overrun_is_recorded_and_the_script_still_exits_0(tmp_path):
    """A shape the interpreter needs minutes for, in a 30 s budget: the suite is killed at its deadline,
    that is recorded, and a table still stands for it."""
    _dry_run(tmp_path, "--budget-s", "30", "--parts", "suite", "--shapes", "4096,256,50000")
    summary = (tmp_path / "summary.md").read_text()
    assert re.search(r"^\| suite \| overran: killed at its deadline \(\d+ s\) \|", summary, re.M), summary
    assert set(os.listdir(tmp_path)) >= {"summary.md", "env.csv", "suite.csv", "gpu_all.log"}


@pytest.mark.slow
def test_grpo_loss_part_times_every_backend(tmp_path, monkeypatch):
    """The part calls prepo_kernels.linear_grpo_loss once per available backend (a row each, timed,
    or saying why that backend cannot run the op), after the GEMM yardstick."""
    import prepo_kernels

    calls = []
    real = prepo_kernels.linear_grpo_loss

    def counting(*args, impl="auto", **kwargs):
        calls.append(impl)
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(prepo_kernels, "linear_grpo_loss", counting)
    gpu_all.part_grpo_loss(gpu_all.parse_args(["--dry-run", "--shapes", "40,16,100"]), tmp_path)
    rows = _table(tmp_path / "grpo_loss.csv")
    impls = prepo_kernels.available_impls("cpu")
    assert [r["impl"] for r in rows] == ["bf16-gemm (h @ W.T)", *impls] and set(calls) == set(impls)
    ran = [r for r in rows[1:] if r["status"] == "ok"]
    assert ran and all(float(r["ms"]) > 0 and float(r["tflops_6ndv"]) > 0 for r in ran)
    assert all(r["status"].startswith("not available") for r in rows[1:] if r not in ran)
