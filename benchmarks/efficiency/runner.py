"""Runs every (strategy, seed) of a benchmark, each as its own ``python -m prepo.train`` process
writing into ``<runs_dir>/<strategy>/seed<k>/``. A run whose ``summary.json`` covers all its steps
(with the same config) is skipped, one with a checkpoint but no summary is resumed, so an
interrupted harness picks up where it stopped. With a runs archive each finished run's small
files go into it as it finishes (the raw data to commit, :mod:`.runs`), and a run finished there
counts as done. ``<runs_dir>/harness.json`` records how the runs were made (command, wall time over
all invocations, machine); the archive keeps a copy."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import yaml

from prepo.config import from_dict

from .config import NON_RESULT_KEYS, ROOT, BenchConfig, full_config, run_config
from .runs import archive_harness, archive_run, load_finished, read_archive, run_files, run_key
from .sequential import status


def config_diff(want: dict, have: dict) -> list[str]:
    """The keys whose values differ between two full trainer configs, except NON_RESULT_KEYS."""
    keys = (set(want) | set(have)) - set(NON_RESULT_KEYS)
    return sorted(k for k in keys if want.get(k) != have.get(k))


def files_status(files: dict, cfg: dict) -> tuple[str, list[str]]:
    """('done' | 'started' | 'new' | 'mismatch', differing keys) of the run of trainer overrides
    ``cfg`` whose small files (:func:`.runs.run_files`) are ``files``."""
    if "config.yaml" not in files:
        return "new", []
    want = full_config(cfg)
    diff = config_diff(want, yaml.safe_load(files["config.yaml"]) or {})
    if diff:
        return "mismatch", diff
    if "summary.json" in files and json.loads(files["summary.json"]).get("steps") == want["total_steps"]:
        return "done", []
    return "started", []


def run_status(run_dir: Path, cfg: dict) -> tuple[str, list[str]]:
    """('done' | 'resume' | 'new' | 'mismatch', differing keys) of the run of trainer overrides
    ``cfg`` in ``run_dir``: a started run resumes from its checkpoint, or starts anew without one."""
    status, diff = files_status(run_files(run_dir), cfg)
    if status != "started":
        return status, diff
    ckpts = run_dir / "checkpoints"
    return ("resume" if ckpts.exists() and any(ckpts.iterdir()) else "new"), []


def prebuild_base_model(cfg: dict) -> None:
    """Build the warm-up checkpoint once, before parallel jobs would each build it."""
    tc = from_dict(cfg)
    if tc.model:
        return
    import torch

    from prepo.warmup import get_base_model_dir

    # the runs' thread count: on a busy 2-core machine extra threads slow this down many-fold
    torch.set_num_threads(tc.num_threads)
    t0 = time.perf_counter()
    path, built = get_base_model_dir(tc.warmup, Path(tc.cache_dir) if tc.cache_dir else None)
    if built:
        print(f"built the warm-up base model in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)


def launch(cfg: dict, resume: bool) -> tuple[int, float]:
    """Run one training job (trainer overrides ``cfg``) as a subprocess; its log goes to
    output_dir/train.log. Returns (exit status, seconds)."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    req = out / "requested.yaml"
    req.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "prepo.train", "--config", str(req)] + (["--resume", "true"] if resume else [])
    threads = str(cfg.get("num_threads", 2))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with (out / "train.log").open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - t0


def plan_runs(bench: BenchConfig, runs_dir: Path, rerun_mismatched: bool,
              archive: Optional[Path] = None) -> list[tuple]:
    """[(strategy, seed, trainer overrides, status)] of every run, seed by seed (so a study cut
    short holds whole paired seeds); a run made with another config is an error, or deleted and
    planned anew with ``rerun_mismatched``. A new run whose copy in the runs ``archive`` is
    finished (same config) is done."""
    archived = read_archive(archive)["runs"] if archive is not None else {}
    plan = []
    for seed in bench.seeds:
        for strategy in bench.strategies:
            cfg = run_config(bench, strategy, seed, runs_dir)
            status, diff = run_status(Path(cfg["output_dir"]), cfg)
            if status == "new" and files_status(archived.get(run_key(strategy, seed), {}), cfg)[0] == "done":
                status = "done"
            if status == "mismatch":
                if not rerun_mismatched:
                    raise SystemExit(f"{cfg['output_dir']} holds a run with a different config (keys {diff}); "
                                     "delete it or pass --rerun-mismatched")
                shutil.rmtree(cfg["output_dir"])
                status = "new"
            plan.append((strategy, seed, cfg, status))
    return plan


_ARCHIVE_LOCK = threading.Lock()   # parallel jobs finish at once: one archive update at a time


def export(item: tuple, archive: Optional[Path]) -> None:
    """Put a planned run's small files into the runs ``archive`` when it is finished in the runs directory."""
    strategy, seed, cfg, _ = item
    if archive is not None and run_status(Path(cfg["output_dir"]), cfg)[0] == "done":
        with _ARCHIVE_LOCK:
            archive_run(Path(cfg["output_dir"]), archive, strategy, seed)


def run_all(bench: BenchConfig, runs_dir: Path, rerun_mismatched: bool = False,
            archive: Optional[Path] = None) -> dict:
    """Run what is not done yet, ``bench.jobs`` at a time, putting each finished run's small files
    into the runs ``archive`` (when given) as it finishes. Returns the timing:
    {wall_seconds, total_seconds_incl_setup, run_seconds: {"<strategy>/seed<k>": seconds}}."""
    t_setup = time.perf_counter()
    plan = plan_runs(bench, runs_dir, rerun_mismatched, archive)
    for item in plan:   # finished before the archive was asked for (idempotent)
        export(item, archive)
    # longest first (dynamic sampling generates several times the rollouts per step), so the
    # parallel slots finish together
    todo = sorted((p for p in plan if p[3] != "done"), key=lambda p: p[0] != "dapo_dynamic")
    print(f"{len(plan)} runs, {len(plan) - len(todo)} already done, {len(todo)} to run "
          f"({bench.jobs} in parallel)", flush=True)
    if todo:
        prebuild_base_model(todo[0][2])
    t_start = time.perf_counter()
    times: dict = {}

    def job(item):
        """Run one planned run, report it; its exit status."""
        strategy, seed, cfg, status = item
        rc, sec = launch(cfg, resume=status == "resume")
        times[f"{strategy}/seed{seed}"] = sec
        if rc == 0:
            export(item, archive)
        state = "ok" if rc == 0 else f"FAILED rc={rc} (see {cfg['output_dir']}/train.log)"
        print(f"[{len(times)}/{len(todo)}] {strategy} seed {seed}: {sec:.0f}s {state} "
              f"(elapsed {time.perf_counter() - t_start:.0f}s)", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=bench.jobs) as pool:
        rcs = list(pool.map(job, todo))
    failed = [f"{s}/seed{k}" for (s, k, _, _), rc in zip(todo, rcs) if rc != 0]
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    end = time.perf_counter()
    return {"wall_seconds": end - t_start, "total_seconds_incl_setup": end - t_setup, "run_seconds": times}


def run_sequential(bench: BenchConfig, runs_dir: Path, rerun_mismatched: bool = False,
                   archive: Optional[Path] = None) -> dict:
    """A sequential study (``bench.sequential``): run the seeds its rule needs (:func:`.run_all`
    on the leading seeds), look, and run the next block while the rule asks for one. Returns the
    timing summed over the blocks run now (as :func:`.run_all`'s)."""
    places = [runs_dir] + ([archive] if archive is not None else [])
    timing: dict = {"wall_seconds": 0.0, "total_seconds_incl_setup": 0.0, "run_seconds": {}}
    ran_up_to = 0
    while not (now := status(bench, load_finished(bench, places)[0])).complete:
        if now.needed <= ran_up_to:   # its runs ran, yet the rule does not see them finished
            raise SystemExit(f"the first {now.needed} seeds ran but only {now.done} are finished paired seeds; "
                             f"see the runs under {runs_dir}")
        print(f"sequential: {now.done} of {now.needed} paired seeds done (cap {now.cap})", flush=True)
        part = run_all(dataclasses.replace(bench, seeds=bench.seeds[:now.needed]), runs_dir, rerun_mismatched, archive)
        timing = {"wall_seconds": timing["wall_seconds"] + part["wall_seconds"],
                  "total_seconds_incl_setup": timing["total_seconds_incl_setup"] + part["total_seconds_incl_setup"],
                  "run_seconds": {**timing["run_seconds"], **part["run_seconds"]}}
        ran_up_to = now.needed
    print(f"sequential: the rule stopped at {now.needed} paired seeds ({now.looks[-1].stop})", flush=True)
    return timing


def save_harness_meta(runs_dir: Path, command: str, timing: dict, jobs: int, archive: Optional[Path] = None) -> dict:
    """Write ``runs_dir/harness.json`` (and its copy in the runs ``archive``) after runs ran; a
    resumed harness adds to what the earlier invocations spent. Returns the timing over all
    invocations."""
    meta = Path(runs_dir) / "harness.json"
    if meta.exists():
        prev = json.loads(meta.read_text()).get("timing", {})
        timing = {**timing, "run_seconds": {**prev.get("run_seconds", {}), **timing["run_seconds"]},
                  "wall_seconds": timing["wall_seconds"] + prev.get("wall_seconds", 0.0),
                  "total_seconds_incl_setup": timing["total_seconds_incl_setup"] + prev.get("total_seconds_incl_setup", 0.0),
                  "invocations": prev.get("invocations", 1) + 1}
    data = {"command": command, "timing": timing, "jobs": jobs, "machine": machine_info(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(data, indent=1))
    if archive is not None:
        archive_harness(archive, data)
    return timing


def load_harness_meta(runs_dir: Path, command: str, archive: Optional[Path] = None) -> tuple[dict, str]:
    """(timing, command) of the invocations that made the runs (``runs_dir``'s harness.json, else
    the runs archive's copy), when nothing ran now: the command names the one that ran them and the
    one aggregating now."""
    meta = Path(runs_dir) / "harness.json"
    data = json.loads(meta.read_text()) if meta.exists() else (read_archive(archive)["harness"] if archive else None)
    if not data:
        return {}, command
    if data.get("command") and data["command"] != command:
        command = f"{data['command']}  (aggregated with: {command})"
    return data.get("timing", {}), command


def machine_info() -> dict:
    """CPU model, core count, Python, platform, torch version and load average."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        info["load_avg_at_report"] = os.getloadavg()
    except OSError:
        pass
    return info
