"""The README's figure: fused log-prob + entropy, forward + backward, time and extra peak memory per
provider at each measured vocabulary size, from the committed ``bench_logprob_entropy.py`` CSVs.

    python benchmarks/plot_kernels.py            # benchmarks/results/logprob_entropy_cpu_*.csv -> kernels_cpu.png
    python benchmarks/plot_kernels.py --csv a.csv b.csv --out figure.png

A provider a CSV has no measured row of (not installed, or not run) is left out of that group.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CSVS = ("logprob_entropy_cpu_4096x1024x32768.csv", "logprob_entropy_cpu_2048x896x151936.csv")
PROVIDERS = {  # provider -> legend, in the legend's order
    "matmul_4": "4 bare matmuls (the floor of a logits-free design)",
    "naive": "PyTorch: logits, log_softmax, gather, entropy",
    "torch_linear_ce": "torch linear_cross_entropy (log-prob only)",
    "cce": "Cut Cross-Entropy (log-prob only)",
    "trl": "TRL: logits, then its chunked log-prob / entropy",
    "liger": "Liger Kernel fused linear CE with entropy",
    "prepo_torch": "prepo_kernels, torch backend",
    "prepo_cpu": "prepo_kernels, cpu backend",
}


def load(paths, scenario: str) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(shape, dtype) -> provider -> (seconds, extra MB), the measured rows of ``scenario``."""
    groups: dict = {}
    for path in paths:
        with Path(path).open() as f:
            for row in csv.DictReader(f):
                if row["scenario"] == scenario and row["median_ms"] and row["provider"] in PROVIDERS:
                    groups.setdefault((row["shape"], row["dtype"]), {})[row["provider"]] = (
                        float(row["median_ms"]) / 1e3, float(row["extra_mb"]))
    return dict(sorted(groups.items(), key=lambda kv: (int(kv[0][0].split("x")[2]), kv[0][1])))


def label(shape: str, dtype: str) -> str:
    n, d, v = (int(x) for x in shape.split("x"))
    return f"V = {v:,}\nN {n:,}, D {d:,}\n{dtype}"


def plot(groups: dict, title: str, out: Path) -> None:
    names = [p for p in PROVIDERS if any(p in g for g in groups.values())]
    width = 0.8 / len(names)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, name in enumerate(names):
        xs = [k for k, g in enumerate(groups.values()) if name in g]
        sec = [list(groups.values())[k][name][0] for k in xs]
        mb = [list(groups.values())[k][name][1] for k in xs]
        style = dict(width=width, label=PROVIDERS[name], hatch="//" if name.startswith("matmul") else None,
                     edgecolor="black" if name == "prepo_cpu" else None)
        pos = [x - 0.4 + (i + 0.5) * width for x in xs]
        ax_t.bar(pos, sec, **style)
        ax_m.bar(pos, mb, **style)
    for ax, ylabel in ((ax_t, "forward + backward, s (median)"), (ax_m, "extra peak memory, MB (log)")):
        ax.set_xticks(range(len(groups)), [label(*k) for k in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    ax_m.set_yscale("log")
    ax_t.set_title("time")
    ax_m.set_title("memory beyond inputs and gradients")
    fig.legend(*ax_t.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, nargs="+", default=[RESULTS / name for name in DEFAULT_CSVS])
    ap.add_argument("--scenario", default="fwdbwd", help="fwd | fwdbwd | fwdbwd_grpo")
    ap.add_argument("--title", default="log-prob + entropy from hidden states and the LM head, "
                                        "2-core AMD EPYC, torch 2.13.0 CPU, 2026-11-25")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels_cpu.png")
    args = ap.parse_args(argv)
    groups = load(args.csv, args.scenario)
    if not groups:
        raise SystemExit(f"no measured {args.scenario} rows in {', '.join(map(str, args.csv))}")
    plot(groups, args.title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
