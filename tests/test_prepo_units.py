"""Unit tests of the PREPO trainer's pieces: window math, weights, loss, task, rewards, config."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prepo.errors import DataError
from prepo.sampler import PromptSampler
from prepo.signals import get_strategy, pacing_rho, window_select, window_start
from prepo.loss import group_advantages, grpo_loss
from prepo.rewards import compute_rewards, math_verify_reward
from prepo.tasks import Problem, get_task, is_heldout
from prepo.tasks.arithmetic import LEVELS, TASK as ARITHMETIC, evaluate_expression, worked_solution
from prepo.signals.weighting import relative_entropy_weights


# ---------------------------------------------------------------- window math
def test_window_rho0_lowest_rho1_highest():
    rng = np.random.default_rng(0)
    ppl = rng.uniform(1, 10, size=50)
    k = 10
    assert set(window_select(ppl, k, 0.0)) == set(np.argsort(ppl)[:k])
    assert set(window_select(ppl, k, 1.0)) == set(np.argsort(ppl)[-k:])


def test_window_start_formula_and_monotone():
    n, k = 40, 8
    starts = [window_start(s / 100, n, k) for s in range(101)]
    assert starts[0] == 0 and starts[-1] == n - k
    assert all(b >= a for a, b in zip(starts, starts[1:]))
    assert window_start(0.5, n, k) == math.floor(0.5 * (n - k))
    rng = np.random.default_rng(1)
    ppl = rng.uniform(1, 10, size=n)
    means = [ppl[window_select(ppl, k, r)].mean() for r in np.linspace(0, 1, 21)]
    assert all(b >= a for a, b in zip(means, means[1:]))
    with pytest.raises(ValueError):
        window_start(0.5, 5, 6)


def test_pacing():
    assert pacing_rho(0, 10) == 0.0 and pacing_rho(5, 10) == 0.5
    for p in ("linear", "quadratic", "exponential"):
        vals = [pacing_rho(s, 20, p) for s in range(21)]
        assert vals[0] == 0.0 and abs(vals[-1] - 1.0) < 1e-12
        assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_strategies_select():
    rng = np.random.default_rng(0)
    ppl = np.arange(20, 0, -1, dtype=float)   # candidate 19 has the lowest perplexity
    low = get_strategy("static_low_ppl").select(ppl, range(20), 4, 0.9, rng)
    assert sorted(low) == [16, 17, 18, 19]
    high = get_strategy("static_high_ppl").select(ppl, range(20), 4, 0.1, rng)   # rho is ignored
    assert sorted(high) == [0, 1, 2, 3] and get_strategy("static_high_ppl").needs_ppl
    assert not get_strategy("static_high_ppl").weighting
    shuffled = np.random.default_rng(5).permutation(50).astype(float)
    assert sorted(get_strategy("static_high_ppl").select(shuffled, range(50), 7, 0.0, rng)) == \
        sorted(np.argsort(-shuffled)[:7].tolist())
    r = get_strategy("random").select(None, range(20), 4, 0.0, rng)
    assert len(r) == 4 and len(set(r)) == 4
    d = get_strategy("dapo_dynamic").select(None, range(20), 4, 0.0, rng)
    assert sorted(d) == list(range(20))
    assert get_strategy("prepo").weighting and not get_strategy("ppl_only").weighting
    assert get_strategy("entropy_only").weighting and not get_strategy("entropy_only").needs_ppl


def test_level_oracle_picks_the_middle_level_first():
    levels = [0, 4, 2, 1, 3, 2, 0, 4, 1, 3]          # by train index; the middle of 0..4 is 2
    oracle = get_strategy("oracle_level")
    assert oracle.needs_levels and not oracle.needs_ppl and not oracle.weighting
    with pytest.raises(RuntimeError, match="set_levels first"):
        oracle.select(None, range(10), 2, 0.0, np.random.default_rng(0))
    oracle.set_levels(levels)
    assert oracle.target == 2.0
    cand = [9, 2, 0, 5, 1, 3]                        # levels 3, 2, 0, 2, 4, 1
    for seed in range(5):
        picked = oracle.select(None, cand, 4, 0.0, np.random.default_rng(seed))
        assert sorted(picked[:2]) == [1, 3]          # the two level-2 candidates come first
        assert sorted(picked[2:]) == [0, 5]          # then the level 3 and level 1 ones (distance 1)
    # equal distances tie in a random order: the RNG decides which of levels 1 / 3 comes first
    firsts = {tuple(oracle.select(None, cand, 3, 0.0, np.random.default_rng(s))) for s in range(20)}
    assert {f[2] for f in firsts} == {0, 5}
    assert oracle.select(None, cand, 3, 0.0, np.random.default_rng(7)) == \
        oracle.select(None, cand, 3, 0.0, np.random.default_rng(7))
    other = get_strategy("oracle_level")            # levels 0..3: the middle is 1.5, levels 1 and 2 tie
    other.set_levels([0, 1, 2, 3])
    assert other.target == 1.5 and sorted(other.select(None, [0, 1, 2, 3], 2, 0.0, np.random.default_rng(0))) == [1, 2]


def test_level_oracle_needs_every_training_level(tmp_path):
    from prepo.builder import make_strategy
    from prepo.config import from_dict
    from prepo.sources import load_data

    cfg = from_dict({"strategy": "oracle_level", "train_size": 30, "eval_per_level": 2})
    oracle = make_strategy(cfg, load_data(cfg))
    assert oracle.target == 2.0 and len(oracle.levels) == 30
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3", "level": 1}\n{"prompt": "2+2=", "answer": "4"}\n')
    cfg = from_dict({"strategy": "oracle_level", "train_data": str(data)})
    with pytest.raises(DataError, match="1 of 2 training problems have none"):
        make_strategy(cfg, load_data(cfg))


def test_sampler_state_roundtrip():
    a = PromptSampler(25, seed=3)
    first = [a.next_batch(10) for _ in range(4)]
    b = PromptSampler(25, seed=3)
    b.next_batch(10)
    c = PromptSampler(25, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch(10) for _ in range(3)] == first[1:]
    assert sorted(first[0] + first[1] + first[2][:5]) == list(range(25))  # one epoch covers every item once


# ---------------------------------------------------------------- weights
def _entropies():
    torch.manual_seed(0)
    ent = torch.rand(6, 7) * 2
    mask = torch.ones(6, 7)
    for i, n in enumerate([7, 3, 5, 1, 6, 2]):
        mask[i, n:] = 0
    return ent * mask, mask


def test_weights_token_weighted_mean_is_one():
    ent, mask = _entropies()
    w = relative_entropy_weights(ent, mask)
    lengths = mask.sum(1)
    assert torch.allclose((w * lengths).sum() / lengths.sum(), torch.tensor(1.0), atol=1e-6)
    h_i = (ent * mask).sum(1) / lengths
    assert torch.allclose(w, h_i / ((ent * mask).sum() / mask.sum()), atol=1e-6)


def test_weights_scale_invariant():
    ent, mask = _entropies()
    assert torch.allclose(relative_entropy_weights(ent, mask), relative_entropy_weights(3.7 * ent, mask), atol=1e-6)


def test_equal_entropies_give_unit_weights_and_plain_loss():
    _, mask = _entropies()
    w = relative_entropy_weights(torch.full_like(mask, 0.8) * mask, mask)
    assert torch.allclose(w, torch.ones(6))
    torch.manual_seed(1)
    lp = torch.randn(6, 7, requires_grad=True)
    old = lp.detach() + 0.3 * torch.randn(6, 7)
    adv = torch.randn(6)
    a = grpo_loss(lp, old, adv, mask, w).loss
    (ga,) = torch.autograd.grad(a, lp)
    b = grpo_loss(lp, old, adv, mask, None).loss
    (gb,) = torch.autograd.grad(b, lp)
    # identical up to float32 rounding of H_i / H_bar (w == 1 to within one ulp)
    assert torch.allclose(a, b, rtol=1e-6, atol=0) and torch.allclose(ga, gb, rtol=1e-6, atol=1e-9)


def test_zero_entropy_batch_gives_unit_weights():
    _, mask = _entropies()
    assert torch.equal(relative_entropy_weights(torch.zeros_like(mask), mask), torch.ones(6))


# ---------------------------------------------------------------- loss
def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4, eps=0.0)
    std = torch.tensor([1.0, 0, 0, 0]).std()
    assert torch.allclose(a[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / std)
    assert torch.equal(group_advantages(r, 4)[4:], torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_loss_hand_computed():
    # two rollouts: lengths 2 and 1; ratios exp(d); eps_low 0.2, eps_high 0.28
    lp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.0]]))      # old log-probs are 0 -> ratio = these
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    w = torch.tensor([1.2, 0.6])
    lp.requires_grad_(True)
    out = grpo_loss(lp, old, adv, mask, w, eps_low=0.2, eps_high=0.28)
    # rollout 0 (A=2): token ratios 1.5 -> min(3.0, 1.28*2=2.56)=2.56 (clipped); 0.9 -> min(1.8, 1.8)=1.8
    # rollout 1 (A=-1): ratio 0.5 -> min(-0.5, -0.8) = -0.8 (clipped)
    expected = -(1.2 * 2.56 + 1.2 * 1.8 + 0.6 * -0.8) / 3
    assert abs(out.loss.item() - expected) < 1e-6
    assert abs(out.clip_frac - 2 / 3) < 1e-6
    out.loss.backward()
    # only the unclipped token carries gradient: d/dlp of -(w*ratio*A)/3 = -(1.2*0.9*2)/3
    expected_grad = torch.tensor([[0.0, -(1.2 * 0.9 * 2) / 3], [0.0, 0.0]])
    assert torch.allclose(lp.grad, expected_grad, atol=1e-6)


def test_loss_kl_term():
    lp = torch.zeros(1, 2)
    ref = torch.log(torch.tensor([[2.0, 0.5]]))
    out = grpo_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), ref_logprob=ref, kl_beta=0.1)
    k3 = [(2.0 - math.log(2.0) - 1), (0.5 - math.log(0.5) - 1)]
    assert abs(out.loss.item() - 0.1 * sum(k3) / 2) < 1e-6


# ---------------------------------------------------------------- task
def test_task_answers_verified():
    probs = ARITHMETIC.generate(500, seed=0) + ARITHMETIC.generate(200, seed=0, split="eval")
    for p in probs:
        assert int(p.answer) == eval(p.prompt[:-1])  # noqa: S307 -- independent check of the task's own evaluator
    assert evaluate_expression("12+7*3") == 33 and evaluate_expression("20-4*5") == 0


def test_worked_solution_steps_and_length():
    assert worked_solution("3+4*5-2") == "4*5=20,3+20=23,23-2=21"
    assert worked_solution("3-8+9") == "3-8=-5,-5+9=4"
    assert worked_solution("7") == "7"
    # every exact solution is a chain of correct steps ending in the answer; steps = operators
    for p in ARITHMETIC.generate(300, seed=1):
        sol = worked_solution(p.prompt[:-1])
        steps = sol.split(",")
        assert len(steps) == LEVELS[p.difficulty][0] - 1
        for st in steps:
            lhs, rhs = st.rsplit("=", 1)
            assert eval(lhs) == int(rhs)  # noqa: S307 -- independent check
        assert sol.rsplit("=", 1)[-1] == p.answer
        # <bos> + prompt + solution + <eos> fits the warm-up model's 64 positions
        assert len(p.prompt) + len(sol) + 2 <= 64


def test_worked_solution_slips_propagate():
    import random as _random
    rng = _random.Random(0)
    exact = worked_solution("9*9+9*9-9")
    slipped = [worked_solution("9*9+9*9-9", rng, slip_rate=0.5) for _ in range(200)]
    assert sum(s != exact for s in slipped) > 100
    for s in slipped:   # each step is off by at most 3, and later steps use the slipped values
        steps = [st.rsplit("=", 1) for st in s.split(",")]
        for lhs, rhs in steps:
            assert abs(eval(lhs) - int(rhs)) <= 3  # noqa: S307
        (_, c1), (_, c2), (l3, c3), (l4, _) = steps
        assert l3 == f"{c1}+{c2}" and l4 == f"{c3}-9"


def test_task_deterministic_and_disjoint():
    assert ARITHMETIC.generate(100, seed=5) == ARITHMETIC.generate(100, seed=5)
    assert ARITHMETIC.generate(100, seed=5) != ARITHMETIC.generate(100, seed=6)
    train = {p.prompt for p in ARITHMETIC.generate(3000, seed=0)}
    evals = ARITHMETIC.balanced(40, 0, "eval")
    assert not train & {p.prompt for p in evals}
    assert all(is_heldout(p.prompt) for p in evals)
    levels = {p.difficulty for p in evals}
    assert levels == {0, 1, 2, 3, 4}


def test_task_alphabet_check():
    ARITHMETIC.check_alphabet([Problem("1+2=", "3", 0)], "ok")
    for prompt in ("what is 1+2?", [{"role": "user", "content": "1+2="}]):
        with pytest.raises(DataError, match="alphabet"):
            ARITHMETIC.check_alphabet([Problem(prompt, "3")], "data.jsonl")


# ---------------------------------------------------------------- rewards
def test_math_verify_reward():
    r = math_verify_reward(["1+2="] * 4, ["3", "4", "", "03"], answer=["3", "3", "3", "3"])
    assert r[:3] == [1.0, 0.0, 0.0]
    assert math_verify_reward(["5-9="], ["-4"], answer=["-4"]) == [1.0]


def test_reward_fn_raising_gives_zero_and_is_counted():
    def flaky(prompts, completions, answer, **kw):
        out = []
        for c, a in zip(completions, answer):
            if c == "boom":
                raise RuntimeError("checker crashed")
            out.append(float(c == a))
        return out

    rewards, failures = compute_rewards(flaky, ["p"] * 4, ["3", "boom", "4", "boom"], answer=["3", "3", "4", "1"])
    assert rewards == [1.0, 0.0, 1.0, 0.0] and failures == 2

    def returns_none(prompts, completions, **kw):
        return [None if c == "x" else 1.0 for c in completions]

    rewards, failures = compute_rewards(returns_none, ["p"] * 3, ["a", "x", "b"])
    assert rewards == [1.0, 0.0, 1.0] and failures == 1
