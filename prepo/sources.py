"""Where a run's problems come from: a built-in task (generated, :mod:`prepo.tasks`) or the user's
files (``--train-data`` / ``--eval-data``, read by :func:`prepo.data.load_examples`). (The reward
that scores them is picked by :func:`prepo.rewards.load_reward_fn`.)"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .config import TrainConfig
from .errors import DataError
from .tasks import Problem, get_task, prompt_key

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    train: list[Problem]
    eval: list[Problem]
    builtin: bool
    skipped: dict = field(default_factory=dict)   # split -> LoadedData.summary() (files only)

    def spearman_pool(self, cfg: TrainConfig) -> list[Problem]:
        """Prompts for the initial perplexity / pass-rate diagnostic: fresh built-in problems, or
        the first training rows."""
        if self.builtin:
            return get_task(cfg.task).generate(cfg.spearman_prompts, cfg.seed + 777, "train", heldout_frac=cfg.heldout_frac)
        return self.train[: cfg.spearman_prompts]


def load_data(cfg: TrainConfig) -> DataSource:
    if cfg.train_data:
        from .data import load_examples

        train = load_examples(cfg.train_data, split_name="train", prompt_column=cfg.prompt_column,
                              answer_column=cfg.answer_column)
        evals = load_examples(cfg.eval_data, split_name="test", prompt_column=cfg.eval_prompt_column or cfg.prompt_column,
                              answer_column=cfg.eval_answer_column or cfg.answer_column) if cfg.eval_data else None
        src = DataSource(train.examples, evals.examples if evals else [], builtin=False,
                         skipped={"train": train.summary(), **({"eval": evals.summary()} if evals else {})})
        for split, info in src.skipped.items():
            log.info("%s data %s: %d rows used, %d skipped %s", split, info["source"], info["examples"],
                     info["skipped"], info["skipped_reasons"] or "")
        if not evals:
            log.warning("no --eval-data: the run will not evaluate")
        if not cfg.model:
            get_task(cfg.task).check_alphabet(src.train + src.eval, f"{cfg.train_data} / {cfg.eval_data or '-'}")
    else:
        task = get_task(cfg.task)
        held_out = task.balanced(cfg.eval_per_level, cfg.seed, "eval", heldout_frac=cfg.heldout_frac)
        src = DataSource(task.generate(cfg.train_size, cfg.seed, "train", heldout_frac=cfg.heldout_frac),
                         [p for p in held_out if p.difficulty >= cfg.eval_min_level], builtin=True)
    overlap = {prompt_key(p.prompt) for p in src.train} & {prompt_key(p.prompt) for p in src.eval}
    if overlap:
        raise DataError(f"{len(overlap)} held-out prompts also appear in training, e.g. {sorted(overlap)[:3]}")
    return src
