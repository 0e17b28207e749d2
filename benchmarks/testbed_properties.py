"""Base-policy properties of a testbed (issue 12) -- measured BEFORE any strategy runs on it.

  python benchmarks/testbed_properties.py --config benchmarks/configs/testbed_phrasing.yaml --seed 0

Builds the testbed's base model (the warm-up, cached) and, with the base policy only (no update):

* Spearman(prompt perplexity, pass rate) over 160 training prompts x 16 samples (the trainer's
  own initial diagnostic), the pass-rate histogram and the pass rate per level; and per
  ``ppl_scope`` (what the perplexity averages: the problem, the user message, the whole prompt)
  the Spearman and the partial Spearman with log prompt length (words of the problem) held fixed;
* the relative-entropy weights w_i = H_i / H_bar over ``--batches`` sampled batches of K randomly
  chosen prompts x G rollouts (the trainer's rollout, scoring and weighting code), pooled and per batch,
  and whether a rollout's w_i relates to its correctness (mean w_i of correct vs wrong rollouts, and
  the Mann-Whitney U test of the two pooled samples);
* the held-out greedy accuracy and avg@k at step 0.

Writes ``benchmarks/results/<config stem>_base.{md,json}``. The seed must be a development seed,
never one the benchmark reports (the harness refuses to report ``tuning_seeds``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prepo.builder import RunParts, build_run  # noqa: E402
from prepo.config import from_dict  # noqa: E402
from prepo.evaluate import initial_diagnostic  # noqa: E402
from prepo.rollout import roll_out  # noqa: E402
from prepo.signals.weighting import relative_entropy_weights  # noqa: E402

SPEARMAN_PROMPTS, SPEARMAN_SAMPLES = 160, 16   # the Spearman diagnostic's pool (the trainer's defaults)


def weight_samples(parts: RunParts, batches: int) -> dict:
    """w_i of ``batches`` random batches (K prompts x G rollouts each) from the base policy."""
    cfg = parts.cfg
    rng = np.random.default_rng(cfg.seed + 99)
    per_batch, pooled, zero_adv, rewards, correct = [], [], [], [], []
    for _ in range(batches):
        idx = rng.choice(len(parts.data.train), cfg.num_selected, replace=False)
        problems = [parts.data.train[i] for i in idx]
        got = roll_out(parts.engine, parts.reward_fn, problems, cfg.group_size)
        ro, r = got.rollouts, got.rewards
        ent = parts.learner.logprobs_and_entropies(ro).entropy
        w = relative_entropy_weights(ent, ro.completion_mask).numpy()
        per_batch.append((float(np.quantile(w, 0.1)), float(np.quantile(w, 0.9)), float(w.min()), float(w.max())))
        pooled += w.tolist()
        correct += (r > 0).tolist()
        zero_adv.append(float((r.view(-1, cfg.group_size).std(dim=1) == 0).float().mean()))
        rewards.append(float(r.mean()))
    pb = np.asarray(per_batch)
    return {
        "batches": batches, "rollouts_per_batch": cfg.num_selected * cfg.group_size,
        "w_pooled_p10": float(np.quantile(pooled, 0.1)), "w_pooled_p50": float(np.quantile(pooled, 0.5)),
        "w_pooled_p90": float(np.quantile(pooled, 0.9)),
        "w_batch_p10_mean": float(pb[:, 0].mean()), "w_batch_p90_mean": float(pb[:, 1].mean()),
        "w_batch_min_mean": float(pb[:, 2].mean()), "w_batch_max_mean": float(pb[:, 3].mean()),
        "zero_adv_frac": float(np.mean(zero_adv)), "reward_mean": float(np.mean(rewards)),
        **weight_by_correctness(np.asarray(pooled), np.asarray(correct, dtype=bool)),
    }


def weight_by_correctness(w: np.ndarray, correct: np.ndarray) -> dict:
    """Mean w_i of correct and of wrong rollouts (``w`` [R] float, ``correct`` [R] bool) and the
    two-sided Mann-Whitney U p-value of the difference (nan when either side is empty)."""
    from scipy.stats import mannwhitneyu

    right, wrong = w[correct], w[~correct]
    both = len(right) > 0 and len(wrong) > 0
    return {"w_mean_correct": float(right.mean()) if len(right) else float("nan"),
            "w_mean_wrong": float(wrong.mean()) if len(wrong) else float("nan"),
            "n_correct": int(len(right)), "n_wrong": int(len(wrong)),
            "w_correct_vs_wrong_pvalue": float(mannwhitneyu(right, wrong).pvalue) if both else float("nan")}


def in_regime(props: dict) -> dict:
    """The issue's targets: Spearman in [-0.35, -0.10]; at most half the prompts at pass rate 0 or
    at 1 (the histogram's end bins); w p10/p90 near the paper's 0.7 / 1.5 (within 0.15 / 0.5)."""
    hist = props["pass_rate_hist"]
    n = sum(hist)
    return {
        "spearman": -0.35 <= props["spearman_ppl_passrate"] <= -0.10,
        "pass_rate_spread": hist[0] <= n / 2 and hist[-1] <= n / 2,
        "weights": abs(props["w_batch_p10_mean"] - 0.7) <= 0.15 and abs(props["w_batch_p90_mean"] - 1.5) <= 0.5,
    }


def measure(train_cfg: dict, seed: int, batches: int, spearman: tuple[int, int] = (SPEARMAN_PROMPTS, SPEARMAN_SAMPLES)) -> dict:
    """Every property of the base policy of ``train_cfg`` (a trainer config), with ``seed``;
    ``spearman`` = (prompts, samples per prompt) of the Spearman pool."""
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict({**train_cfg, "strategy": "random", "seed": seed, "output_dir": out, "progress": False,
                         "tensorboard": False, "spearman_prompts": spearman[0], "spearman_samples": spearman[1]})
        torch.set_num_threads(cfg.num_threads)
        parts = build_run(cfg)
        props = initial_diagnostic(parts)
        props.update(weight_samples(parts, batches))
    props["in_regime"] = in_regime(props)
    return props


def render(name: str, props: dict, command: str) -> str:
    ev = props.get("eval", {})
    reg = props["in_regime"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    return "\n".join([
        f"# Base-policy properties: {name}", "", f"Command: `{command}` (base policy only, no strategy run).", "",
        "| property | value | paper / target | in range |", "|---|---|---|---|",
        f"| Spearman(prompt ppl, pass rate) | {props['spearman_ppl_passrate']:.3f} (p = {props['spearman_pvalue']:.2g}, "
        f"{props['n_prompts']} prompts x {props['samples']} samples) | -0.35 .. -0.10 (paper -0.17 .. -0.23) | {yes(reg['spearman'])} |",
        *scope_rows(props),
        f"| pass-rate histogram (5 bins 0..1) | {props['pass_rate_hist']} (mean {props['pass_rate_mean']:.3f}) | "
        f"<= half at 0 and <= half at 1 | {yes(reg['pass_rate_spread'])} |",
        f"| w_i per batch, mean p10 / p90 | {props['w_batch_p10_mean']:.2f} / {props['w_batch_p90_mean']:.2f} "
        f"(min..max {props['w_batch_min_mean']:.2f}..{props['w_batch_max_mean']:.2f}) | about 0.7 / 1.5 | {yes(reg['weights'])} |",
        f"| w_i pooled p10 / p50 / p90 | {props['w_pooled_p10']:.2f} / {props['w_pooled_p50']:.2f} / {props['w_pooled_p90']:.2f} "
        f"({props['batches']} batches x {props['rollouts_per_batch']} rollouts) | | |",
        f"| w_i mean, correct / wrong rollouts | {props['w_mean_correct']:.2f} / {props['w_mean_wrong']:.2f} "
        f"({props['n_correct']} / {props['n_wrong']} rollouts; Mann-Whitney p = {props['w_correct_vs_wrong_pvalue']:.2g}) | | |",
        f"| zero-advantage groups (random K) | {props['zero_adv_frac']:.2f} | | |",
        f"| held-out greedy accuracy / avg@k at step 0 | {ev.get('accuracy', float('nan')):.3f} / "
        f"{next((v for k, v in ev.items() if k.startswith('avg@')), float('nan')):.3f} | | |",
        "",
    ])


def scope_rows(props: dict) -> list[str]:
    """One table row per ppl_scope measured: Spearman and the partial Spearman given log length;
    then the pass rate per level."""
    rows = []
    for scope, st in props.get("by_scope", {}).items():
        rows.append(f"| ppl_scope {scope}: Spearman / partial given log words | {st['spearman']:.3f} (p = {st['pvalue']:.2g}) "
                    f"/ {st['partial_spearman_loglen']:.3f} (p = {st['partial_pvalue']:.2g}) | | |")
    levels = props.get("pass_rate_by_level")
    if levels:
        rows.append("| pass rate per level (prompts) | " + ", ".join(f"{k}: {v[0]:.2f} ({v[1]})" for k, v in levels.items())
                    + " | | |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a benchmark config (its train: section is used)")
    ap.add_argument("--seed", type=int, default=0, help="a development seed (listed in the config's tuning_seeds)")
    ap.add_argument("--batches", type=int, default=8, help="sampled batches for the weight distribution")
    ap.add_argument("--spearman-prompts", type=int, default=SPEARMAN_PROMPTS, help="prompts in the Spearman pool")
    ap.add_argument("--spearman-samples", type=int, default=SPEARMAN_SAMPLES, help="samples per prompt (pass@k)")
    args = ap.parse_args(argv)
    path = Path(args.config)
    bench = yaml.safe_load(path.read_text())
    if args.seed in bench.get("seeds", []):
        raise SystemExit(f"seed {args.seed} is a reported seed of {path}; measure with a development seed")
    props = measure(dict(bench.get("train", {})), args.seed, args.batches, (args.spearman_prompts, args.spearman_samples))
    command = "python benchmarks/testbed_properties.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = path.stem
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    md = render(bench.get("title", stem), props, command)
    (out / f"{stem}_base.md").write_text(md)
    (out / f"{stem}_base.json").write_text(json.dumps({"command": command, **props}, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
