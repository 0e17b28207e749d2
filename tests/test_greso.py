"""GRESO's pre-rollout filter (prepo/signals/greso.py): the skip rule, exploration, adaptation and
state (a killed and resumed ``--strategy greso`` run: tests/test_prepo_train.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prepo.signals.greso import EASY, HARD, Greso, GresoParams, group_kinds
from prepo.signals.strategies import get_strategy


def _rewards(*groups) -> torch.Tensor:
    return torch.tensor([r for g in groups for r in g], dtype=torch.float32)


def test_group_kinds():
    r = _rewards([1, 1, 1], [0, 0, 0], [1, 0, 1], [0.5, 0.5, 0.5])
    assert group_kinds(r, 3) == [EASY, HARD, 0, EASY]


def test_streaks_follow_the_rewards():
    g = Greso()
    g.observe([7, 8, 9], _rewards([1, 1], [0, 0], [0, 1]), 2)
    assert g.streaks == {7: (EASY, 1), 8: (HARD, 1)}
    g.observe([7, 8, 9], _rewards([1, 1], [1, 1], [0, 0]), 2)
    assert g.streaks == {7: (EASY, 2), 8: (EASY, 1), 9: (HARD, 1)}   # a change of kind restarts the run
    g.observe([7], _rewards([1, 0]), 2)                                   # informative: no streak
    assert 7 not in g.streaks
    with pytest.raises(ValueError, match="2 prompts but 1 reward groups"):
        g.observe([1, 2], _rewards([1, 1]), 2)


def test_keep_probability_is_p_to_the_streak():
    g = Greso()
    g.p_easy, g.p_hard = 0.5, 0.8
    g.streaks = {1: (EASY, 1), 2: (EASY, 3), 3: (HARD, 2), 4: (EASY, 40)}
    assert g.keep_probability(0) == 1.0
    assert g.keep_probability(1) == 0.5 and g.keep_probability(2) == 0.125
    assert abs(g.keep_probability(3) - 0.64) < 1e-12
    assert g.keep_probability(4) == 0.01                                   # the reference code's floor


def test_skips_exactly_what_the_rule_draws():
    """Replay the draws with a copy of the generator: a prompt is kept iff its uniform draw is below
    its keep probability, in the scan order of the permutation, until k are kept."""
    g = Greso()
    g.p_easy, g.p_hard = 0.6, 0.3
    cand = list(range(100, 140))
    g.streaks = {c: ((EASY if c % 2 else HARD), 1 + c % 3) for c in cand if c % 5}
    rng = np.random.default_rng(11)
    replay = np.random.default_rng(11)
    got = g.select(cand, 12, rng)
    kept, skipped = [], 0
    for i in replay.permutation(len(cand)).tolist():
        if len(kept) == 12:
            break
        if replay.random() < g.keep_probability(cand[i]):
            kept.append(i)
        else:
            skipped += 1
    assert got == kept and skipped > 0 and g.last == {"greso_skipped": skipped, "greso_backfilled": 0}
    assert any(cand[i] in g.streaks for i in got)        # some zero-variance prompts were explored


def test_never_explored_prompts_are_skipped_and_backfilled():
    """With p = 0 and no floor every streak prompt is skipped; when too few others remain, the k
    slots are filled from the skipped ones in scan order, and counted as backfilled."""
    g = Greso(GresoParams(p_init=0.0, min_keep=0.0))
    cand = list(range(10))
    g.streaks = {c: (HARD, 1) for c in cand if c >= 3}   # only 0, 1, 2 are informative or new
    got = g.select(cand, 2, np.random.default_rng(0))
    assert len(got) == 2 and set(got) <= {0, 1, 2} and g.last["greso_backfilled"] == 0
    rng, replay = np.random.default_rng(1), np.random.default_rng(1)
    got = g.select(cand, 5, rng)
    scan = replay.permutation(10).tolist()
    assert got[:3] == [i for i in scan if i < 3]
    assert got[3:] == [i for i in scan if i >= 3][:2]
    assert g.last == {"greso_skipped": 5, "greso_backfilled": 2}


@pytest.mark.parametrize("p,z", [(0.3, 1), (0.3, 2), (0.7, 1)])
def test_explores_with_the_set_probability(p, z):
    n = 4000
    g = Greso()
    g.p_easy = p
    cand = list(range(n))
    g.streaks = {c: (EASY, z) for c in cand}
    g.select(cand, n, np.random.default_rng(123))        # k = n: every prompt is scanned once
    explored = (n - g.last["greso_backfilled"]) / n
    want = p ** z
    assert abs(explored - want) < 4 * (want * (1 - want) / n) ** 0.5, (explored, want)


def test_probabilities_adapt_toward_the_target():
    P = GresoParams()
    assert (P.p_init, P.target_zero_var, P.step, P.p_min, P.p_max) == (0.5, 0.25, 0.01, 0.05, 0.95)
    g = Greso()
    g.observe(range(4), _rewards([1, 1], [1, 1], [1, 1], [0, 1]), 2)   # 75% easy >= 1/12, 0% hard < 1/6
    assert abs(g.p_easy - 0.49) < 1e-12 and abs(g.p_hard - 0.51) < 1e-12
    g.observe(range(4), _rewards([0, 0], [0, 0], [0, 1], [0, 1]), 2)   # 0% easy, 50% hard
    assert abs(g.p_easy - 0.50) < 1e-12 and abs(g.p_hard - 0.50) < 1e-12
    for _ in range(100):
        g.observe(range(2), _rewards([1, 1], [0, 0]), 2)               # too many of both: clip at p_min
    assert g.p_easy == g.p_hard == 0.05
    for _ in range(100):
        g.observe(range(2), _rewards([1, 0], [0, 1]), 2)               # none: clip at p_max
    assert g.p_easy == g.p_hard == 0.95


def test_state_round_trips_through_torch_save(tmp_path):
    s = get_strategy("greso")
    assert s.greso is not get_strategy("greso").greso                  # each run owns its state
    s.observe([3, 4, 5], _rewards([1, 1], [0, 0], [1, 0]), 2)
    s.select(None, list(range(10)), 4, 0.0, np.random.default_rng(0))
    torch.save(s.state_dict(), tmp_path / "st.pt")
    t = get_strategy("greso")
    t.load_state_dict(torch.load(tmp_path / "st.pt", weights_only=False))
    assert t.state_dict() == s.state_dict() and t.greso.streaks == {3: (EASY, 1), 4: (HARD, 1)}
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    assert s.select(None, list(range(10)), 4, 0.0, a) == t.select(None, list(range(10)), 4, 0.0, b)
    with pytest.raises(ValueError, match="strategy .random. does not have"):
        get_strategy("random").load_state_dict(s.state_dict())
    get_strategy("random").load_state_dict(None)

