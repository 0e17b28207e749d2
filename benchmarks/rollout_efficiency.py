"""Does PREPO save rollouts? (issue 5) -- ``python benchmarks/rollout_efficiency.py [--config X.yaml]``

Runs every (strategy, seed) of ONE committed config (default
``benchmarks/configs/rollout_efficiency.yaml``, hyperparameters fixed before measuring), each as its
own ``python -m prepo.train`` process writing into ``<runs_dir>/<strategy>/seed<k>/``, then reports
under ``benchmarks/results/<config name>.{md,csv,json,png}`` (+ ``_diagnostics.png``):

* PRIMARY: per seed, the rollouts a strategy needs to reach the baseline's (paired) final accuracy
  (or, with ``primary: half_budget_threshold``, its accuracy at half its budget) over the
  baseline's; geometric mean over seeds with a 95% paired-bootstrap CI, censored seeds counted, and the pre-registered decision ('saves rollouts' / 'costs rollouts' / 'inconclusive');
* SECONDARY: final-accuracy and area-under-curve differences to the baseline, with CIs;
* diagnostics for the "why" (zero-advantage groups, weights, entropy, selected difficulty, GRESO
  skips), the initial policy's Spearman(prompt perplexity, pass rate), per-level and per-seed tables;
* plots: accuracy vs cumulative rollouts (mean over seeds, 95% bootstrap band), diagnostics.

The statistics are in ``benchmarks/efficiency/stats.py``. Runs whose ``summary.json`` exists (with
the same config) are skipped, runs with a checkpoint but no summary are resumed, so an interrupted
harness picks up where it stopped. Each finished run's small files (metrics.jsonl, eval.jsonl,
selection.jsonl, initial.json, summary.json, config.yaml; never checkpoints) go into the study's
runs archive as it finishes, ``benchmarks/results/<config name>_runs.json.gz`` (one file to
commit, with how the runs were made); the report reads a run from there when the runs directory
lacks it (a fresh clone), and lists the runs not finished yet. A config with a ``sequential:``
section runs its seeds in blocks and only as many as its stopping rule needs
(``benchmarks/efficiency/sequential.py``); its report says "incomplete", with the seeds done and
needed, until the rule stops.

  python benchmarks/rollout_efficiency.py                  # full run + aggregate (the evidence)
  python benchmarks/rollout_efficiency.py --config benchmarks/configs/testbed_countdown.yaml
  python benchmarks/rollout_efficiency.py --aggregate-only # re-aggregate existing runs
  python benchmarks/rollout_efficiency.py --quick          # tiny smoke version into a temp dir
  python benchmarks/rollout_efficiency.py --update-readme README.md  # also paste the table there

``--quick`` writes nothing under benchmarks/results/ (its report goes to the temp dir).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # this checkout's trainer

from efficiency import runner  # noqa: E402
from efficiency.config import DEFAULT_CONFIG, RESULTS_DIR, load_bench_config  # noqa: E402
from efficiency.report import primary_table, write_report  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line (``argv``, default sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG.relative_to(ROOT)), help="benchmark config (YAML)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke version into a temp dir (not the evidence)")
    ap.add_argument("--aggregate-only", action="store_true", help="only aggregate existing runs")
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the config's)")
    ap.add_argument("--runs-dir", default=None, help="where the runs go (default: the config's; --quick: a temp dir)")
    ap.add_argument("--results-dir", default=None, help="where the report goes (default benchmarks/results; --quick: the temp dir)")
    ap.add_argument("--runs-archive", default=None, help="the study's runs archive (default: "
                    "<results dir>/<config name>_runs.json.gz; --quick: none)")
    ap.add_argument("--rerun-mismatched", action="store_true", help="delete and rerun runs made with another config")
    ap.add_argument("--update-readme", default=None, metavar="README.md", help="also put the table in this README")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run what is missing (unless --aggregate-only), then write the report; 0 on success."""
    args = parse_args(argv)
    config_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    bench = load_bench_config(config_path, quick=args.quick)
    if args.jobs is not None:
        bench = dataclasses.replace(bench, jobs=args.jobs)
    tmp = Path(tempfile.mkdtemp(prefix=f"{bench.stem}_quick_")) if args.quick else None
    runs_dir = Path(args.runs_dir) if args.runs_dir else (tmp / "runs" if args.quick else ROOT / bench.runs_dir)
    results_dir = Path(args.results_dir) if args.results_dir else (tmp / "results" if args.quick else RESULTS_DIR)
    archive = Path(args.runs_archive) if args.runs_archive else (
        None if args.quick else results_dir / f"{bench.stem}_runs.json.gz")
    if args.quick and results_dir.resolve() == RESULTS_DIR.resolve():
        raise SystemExit("--quick must not overwrite the committed results; pick another --results-dir")
    command = "python " + shlex.join(["benchmarks/rollout_efficiency.py"] + list(sys.argv[1:] if argv is None else argv))

    timing: dict = {}
    if not args.aggregate_only:
        run = runner.run_sequential if bench.sequential else runner.run_all
        timing = run(bench, runs_dir, args.rerun_mismatched, archive)
        if timing["run_seconds"]:   # something ran: remember how the runs were made
            timing = runner.save_harness_meta(runs_dir, command, timing, bench.jobs, archive)
    if not timing.get("run_seconds"):   # nothing ran now: report how the runs were made
        timing, command = runner.load_harness_meta(runs_dir, command, archive)
    config_name = str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path)
    out = write_report(bench, runs_dir, results_dir, command, config_name, timing,
                       Path(args.update_readme) if args.update_readme else None, archive)
    if out["status"] is not None and not out["status"].complete:
        st = out["status"]
        print(f"\nINCOMPLETE: {st.done} of {st.needed} paired seeds done (cap {st.cap}); the rule has not stopped")
    print("\n" + (primary_table(out["aggregate"], bench.metric) if out["aggregate"] else
                  "no finished run of the baseline yet") + "\n")
    print("wrote: " + ", ".join(out["files"]))
    if args.quick:
        print(f"(--quick: a smoke test, not the evidence; runs in {runs_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
