"""The premise estimate and the curriculum direction (prepo/signals/premise.py), on a synthetic
scorer whose sign the test sets: a candidate's hidden difficulty d in [0, 1] gives its pass rate
(1 - d, with noise) and its perplexity (rising with d for the paper's sign, falling for the
reverse); and in the trainer, with the built-in task's levels as the hidden difficulty."""
import logging
import math

import numpy as np
import pytest

from prepo.config import ConfigError, from_dict
from prepo.signals.pacing import window_select
from prepo.signals.premise import Premise, PremiseParams, partial_spearman, premise_stats, spearman
from prepo.signals.strategies import get_strategy

B, K = 40, 8


def synthetic_step(premise, rng, sign: float, rho: float, step: int = 0, strategy=None):
    """One step: candidates, their perplexities (exp(sign * d) with noise), the selection, and the
    rolled-out prompts' pass rates (1 - d with noise); the premise observes them (and, under
    ``auto``, may turn the window)."""
    d = rng.random(B)
    ppl = np.exp(2.0 * sign * d + 0.3 * rng.standard_normal(B)) + 1
    order = premise.select(strategy or get_strategy("prepo"), ppl, list(range(B)), K, rho, rng)
    rates = np.clip(1 - d[order] + 0.2 * rng.standard_normal(len(order)), 0, 1)
    premise.observe(ppl, order, rates.tolist(), step=step)
    return ppl, order


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_estimate_has_the_scorers_sign(sign):
    """Perplexity rising with difficulty is the paper's premise: a negative estimate; falling, positive."""
    rng = np.random.default_rng(0)
    premise = Premise(PremiseParams(probes=3, window_steps=5))
    for step in range(5):
        synthetic_step(premise, rng, sign, step / 5)
    rho, p, n = premise.estimate()
    assert n == 5 * K and p < 0.01 and np.sign(rho) == -sign
    stats = premise.stats()
    assert stats["premise_prompts"] == 5 * K and stats["premise_direction"] == 1
    assert stats["premise_spearman"] == pytest.approx(rho, abs=1e-6)


def test_estimate_pools_the_last_window_steps():
    rng = np.random.default_rng(1)
    premise = Premise(PremiseParams(probes=2, window_steps=3))
    assert premise.stats() is None   # nothing observed: no record fields (a strategy that does not score)
    synthetic_step(premise, rng, 1.0, 0.0)
    assert premise.stats()["premise_prompts"] == K
    for step in range(1, 7):
        synthetic_step(premise, rng, 1.0, step / 7, step)
    assert premise.estimate()[2] == 3 * K


def test_probes_come_from_outside_the_window_and_without_probes_nothing_changes():
    rng = np.random.default_rng(2)
    ppl = rng.random(B)
    strategy = get_strategy("prepo")
    plain = Premise()
    state = rng.bit_generator.state
    assert plain.select(strategy, ppl, list(range(B)), K, 0.3, rng) == window_select(ppl, K, 0.3).tolist()
    assert rng.bit_generator.state == state   # no probes: the selection RNG is not drawn
    probed = Premise(PremiseParams(probes=3)).select(strategy, ppl, list(range(B)), K, 0.3, rng)
    window = window_select(ppl, K - 3, 0.3).tolist()
    assert probed[: K - 3] == window and len(set(probed)) == K and not set(probed[K - 3:]) & set(window)


def test_high_to_low_walks_the_window_from_the_top():
    ppl = np.arange(B, dtype=float)
    premise = Premise(PremiseParams(direction="high_to_low"))
    first = premise.select(get_strategy("prepo"), ppl, list(range(B)), K, 0.0, None)
    last = premise.select(get_strategy("prepo"), ppl, list(range(B)), K, 1.0, None)
    assert sorted(first) == list(range(B - K, B)) and sorted(last) == list(range(K))
    premise.observe(ppl, last, [0.5] * K, step=1)
    assert premise.stats()["premise_direction"] == -1


def test_auto_turns_the_window_when_the_estimate_is_reliably_positive(caplog):
    rng = np.random.default_rng(3)
    premise = Premise(PremiseParams(direction="auto", probes=3, window_steps=4))
    with caplog.at_level(logging.WARNING, logger="prepo"):
        for step in range(1, 9):
            synthetic_step(premise, rng, -1.0, step / 10, step)   # the reversed premise
            if premise.high_to_low:
                break
    assert premise.high_to_low and premise.turned_at == step and premise.position(0.2) == pytest.approx(0.8)
    assert "the curriculum window now runs high to low perplexity" in caplog.text
    # under the new direction the same reversed premise is the expected one: it stays turned
    for step in range(step + 1, step + 8):
        synthetic_step(premise, rng, -1.0, step / 20, step)
    assert premise.high_to_low


def test_auto_keeps_the_papers_direction_when_the_premise_holds():
    rng = np.random.default_rng(4)
    premise = Premise(PremiseParams(direction="auto", probes=3, window_steps=4))
    for step in range(1, 12):
        synthetic_step(premise, rng, 1.0, step / 12, step)
    assert not premise.high_to_low and premise.turned_at is None


def test_fixed_directions_never_turn():
    rng = np.random.default_rng(5)
    premise = Premise(PremiseParams(direction="low_to_high", probes=3, window_steps=4))
    for step in range(1, 8):
        synthetic_step(premise, rng, -1.0, step / 8, step)
    assert not premise.high_to_low and premise.estimate()[0] > 0


def test_state_roundtrip():
    rng = np.random.default_rng(6)
    a = Premise(PremiseParams(direction="auto", probes=2, window_steps=3))
    for step in range(4):
        synthetic_step(a, rng, -1.0, step / 4)
    a.high_to_low, a.turned_at = True, 2
    b = Premise(PremiseParams(direction="auto", probes=2, window_steps=3))
    b.load_state_dict(a.state_dict())
    assert b.stats() == a.stats() and b.turned_at == 2 and b.position(0.1) == a.position(0.1)
    b.load_state_dict(None)   # a checkpoint from before the estimate
    assert b.stats() == a.stats()


def test_statistics():
    x = np.arange(20.0)
    assert spearman(x, x ** 3)[0] == pytest.approx(1.0) and math.isnan(spearman(x, np.ones(20))[0])
    # y follows z alone; x follows z too: the plain Spearman is high, the partial one near 0
    rng = np.random.default_rng(7)
    z = rng.random(300)
    xs, ys = z + 0.1 * rng.standard_normal(300), z + 0.1 * rng.standard_normal(300)
    assert spearman(xs, ys)[0] > 0.7 and abs(partial_spearman(xs, ys, z)[0]) < 0.15
    # an effect of its own survives the control
    ys2 = ys - 2 * (xs - z)
    r, p = partial_spearman(xs, ys2, z)
    assert r < -0.5 and p < 1e-6
    stats = premise_stats(xs + 1, ys, np.exp(z))   # the length is taken in logs
    assert stats["partial_spearman_loglen"] == pytest.approx(partial_spearman(xs, ys, z)[0])


def test_config_keys():
    cfg = from_dict({"curriculum_direction": "auto", "premise_probes": 2})
    assert (cfg.curriculum_direction, cfg.premise_probes, cfg.premise_window_steps) == ("auto", 2, 5)
    for bad, match in [({"curriculum_direction": "up"}, "curriculum_direction must be one of"),
                       ({"curriculum_direction": "auto"}, "auto needs premise_probes >= 1"),
                       ({"premise_probes": 13}, "below the 13 selected prompts"),
                       ({"premise_window_steps": 0}, "premise_window_steps must be >= 1"),
                       ({"strategy": "random", "premise_probes": 1}, "strategy 'random' has none"),
                       ({"strategy": "static_low_ppl", "curriculum_direction": "high_to_low"}, "has none")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(bad)


@pytest.mark.slow
def test_trainer_turns_the_window_on_a_reversed_scorer(tmp_path, tiny_cache_dir, caplog):
    """The trainer with a scorer that ranks the built-in task's hard levels lowest (the reverse of
    the premise; the base model passes the easy levels more often): the logged estimate is positive
    and ``auto`` turns the window; the metrics and the progress record carry it every step."""
    import json

    from trainer_harness import TINY

    from prepo.train import Trainer

    cfg = from_dict({**TINY, "total_steps": 6, "candidate_batch_size": 24, "select_ratio": 0.5, "group_size": 2,
                     "premise_probes": 6, "premise_window_steps": 6, "curriculum_direction": "auto",
                     "spearman_prompts": 0, "eval_every": 0, "save_every": 0, "output_dir": str(tmp_path / "run"),
                     "cache_dir": str(tiny_cache_dir), "tensorboard": False})
    levels = {}
    # the rollouts' reward is the level's: the easy levels pass, the hard ones fail
    trainer = Trainer(cfg, reward_fn=lambda prompts, completions, **kw: [float(levels[p] <= 1) for p in prompts])
    levels.update({p.prompt: p.difficulty for p in trainer.data.train})
    trainer.perplexity = lambda cand, timer: np.array(
        [10.0 - trainer.data.train[i].difficulty + 0.01 * j for j, i in enumerate(cand)], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="prepo"):
        trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("premise_spearman" in r and r["premise_direction"] in (1, -1) for r in rows)
    assert rows[-1]["premise_direction"] == -1 and "now runs high to low perplexity" in caplog.text
