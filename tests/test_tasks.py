"""The built-in tasks (testbeds): generation, held-out split, worked solutions, checkers, config."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from prepo.config import from_dict
from prepo.errors import ConfigError
from prepo.rewards import load_reward_fn
from prepo.sources import load_data
from prepo.tasks import TASKS, get_task, is_heldout
from prepo.tasks import countdown, phrasing
from prepo.tokenizer import build_tokenizer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_generates_disjoint_splits_in_its_alphabet(name):
    task = get_task(name)
    train = task.generate(400, seed=3)
    evals = task.balanced(10, 3, "eval")
    assert {p.difficulty for p in evals} == set(range(task.num_levels))
    assert not {task.split_key(p.prompt) for p in train} & {task.split_key(p.prompt) for p in evals}
    assert all(is_heldout(task.split_key(p.prompt)) for p in evals)
    task.check_alphabet(train + evals, "generated")
    rng = random.Random(0)
    tok = build_tokenizer(task.chars)
    for p in train[:50]:
        sol = task.corpus_solution(p, rng, 0.1)
        assert set(sol) <= set(task.chars)
        ids = tok(p.prompt + sol)["input_ids"]
        # + <eos> fits the toy model's positions (a task for pretrained models has no toy)
        assert tok.unk_token_id not in ids and (task.needs_model or len(ids) + 1 <= 64)
    assert task.generate(50, seed=3) == task.generate(50, seed=3) != task.generate(50, seed=4)
    with pytest.raises(ValueError, match="level_weights"):
        task.generate(5, 0, level_weights=(1.0,) * (task.num_levels + 1))


def test_countdown_checker():
    ok = countdown.check
    assert ok("3,7,9:30=", "7*3=21,21+9=30")
    assert ok("3,7,9:30=", "3*7=21,9+21=30")            # another order is another right answer
    assert ok("2,5,9:14=", "9+5=14")                    # numbers need not all be used
    assert ok("8,4,3:6=", "8/4=2,2*3=6")
    assert not ok("3,7,9:30=", "7*3=21,21+9=31")        # wrong arithmetic
    assert not ok("3,7,9:30=", "7*3=21,21+9=30,30-9=21")  # ends elsewhere (and reuses 9)
    assert not ok("3,7,9:49=", "7*7=49")                # 7 given once
    assert not ok("3,7,9:30=", "")
    assert not ok("3,7,9:30=", "7*3=21, 21+9=30x")
    assert not ok("9,2,5:4=", "9/2=4")                  # inexact division
    assert not ok("3,7:4=", "3-7=-4")                   # negative intermediates are not allowed
    with pytest.raises(ValueError, match="Countdown prompt"):
        ok("3+4=", "7")
    assert countdown.countdown_reward(["3,7,9:30="] * 2, ["7*3=21,21+9=30", "7+3=10"]) == [1.0, 0.0]


def test_countdown_corpus_solutions_solve_their_problems_and_slips_break_them():
    task = get_task("countdown")
    probs = task.generate(300, seed=1)
    rng = random.Random(0)
    assert all(countdown.check(p.prompt, task.corpus_solution(p, rng, 0.0)) for p in probs)
    slipped = [countdown.check(p.prompt, task.corpus_solution(p, rng, 0.5)) for p in probs]
    assert 0 < sum(slipped) < len(probs)
    # several right answers: the generating paths of one prompt's problems differ
    assert len({p.columns["solution"] for p in probs}) > 0.9 * len(probs)


def test_phrasing_round_trip_and_familiarity_mix():
    for expr in ("3+4*5-2", "7", "9-9*0"):
        for ph in phrasing.PHRASINGS:
            assert phrasing.canonical(phrasing.phrase(expr, ph)) == expr
    task = get_task("phrasing")
    warm = Counter(p.columns["phrasing"] for p in task.generate(4000, 0, unique=False, for_warmup=True))
    pool = Counter(p.columns["phrasing"] for p in task.generate(4000, 0, unique=False))
    for ph, w in zip(phrasing.PHRASINGS, phrasing.WARMUP_PHRASING_WEIGHTS):
        assert abs(warm[ph] / 4000 - w) < 0.03          # the warm-up skews the phrasings
        assert abs(pool[ph] / 4000 - 0.25) < 0.03       # the RL pool does not
    levels = Counter(p.difficulty for p in task.generate(4000, 0, unique=False, for_warmup=True))
    assert max(levels.values()) / min(levels.values()) < 1.2   # ... and the warm-up's levels are even
    rng = random.Random(0)
    sols = {task.corpus_solution(task.make_problem(random.Random(5), 4, False), rng, 0.0) for _ in range(40)}
    assert len(sols) > 1                                 # operands of + and * steps in either order


def test_task_config_and_reward(tmp_path):
    assert from_dict({"task": "countdown"}).warmup.task == "countdown"
    assert from_dict({}).warmup.key() != from_dict({"task": "phrasing"}).warmup.key()
    with pytest.raises(ConfigError, match="task must be one of"):
        from_dict({"task": "sudoku"})
    with pytest.raises(ConfigError, match="warmup_level_weights must be 4"):
        from_dict({"task": "countdown", "warmup_level_weights": "1,1,1,1,1"})
    cfg = from_dict({"task": "countdown", "train_size": 20, "eval_per_level": 2})
    assert load_reward_fn(cfg) is countdown.countdown_reward
    assert all(countdown.parse_prompt(p.prompt) for p in load_data(cfg).train)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    assert load_reward_fn(from_dict({"task": "countdown", "train_data": str(data)})) is not countdown.countdown_reward


def test_eval_min_level_drops_the_easy_levels_from_the_held_out_split(tmp_path):
    every = load_data(from_dict({"train_size": 20, "eval_per_level": 6}))
    kept = load_data(from_dict({"train_size": 20, "eval_per_level": 6, "eval_min_level": 2}))
    assert {p.difficulty for p in every.eval} == {0, 1, 2, 3, 4} and {p.difficulty for p in kept.eval} == {2, 3, 4}
    assert kept.eval == [p for p in every.eval if p.difficulty >= 2] and kept.train == every.train
    with pytest.raises(ConfigError, match="eval_min_level must be a level of task 'countdown', 0 to 3"):
        from_dict({"task": "countdown", "eval_min_level": 4})
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    with pytest.raises(ConfigError, match="eval_min_level applies to the built-in task"):
        from_dict({"train_data": str(data), "eval_min_level": 1})


def _wordmath_value(prompt: str) -> int:
    """The answer a wordmath prompt asks for, read back from its words."""
    nums = [int(x) for x in re.findall(r"\d+", prompt)]
    if "bags" in prompt:
        return nums[0] * nums[1] - (nums[2] if "loses" in prompt else 0)
    if "more" in prompt or "left" in prompt:
        return nums[0] + nums[1] if "more" in prompt else nums[0] - nums[1]
    ops = re.findall(r" (\+|-|\*|plus|minus|times) ", prompt)
    value = nums[0]
    for op, n in zip(ops, nums[1:]):
        value = value + n if op in ("+", "plus") else value - n if op in ("-", "minus") else value * n
    return value


def test_wordmath_problems_answers_and_split():
    from prepo.tasks.wordmath import FORMS

    task = get_task("wordmath")
    probs = task.balanced(30, 0, "train")
    assert {p.difficulty for p in probs} == set(range(5))
    for p in probs:   # the answer is what the prompt's arithmetic gives
        assert int(p.answer) == _wordmath_value(p.prompt) >= 1, p.prompt
    # the wording is drawn independently of the level: every form at every level, similar lengths
    pool = task.generate(400, seed=0)
    for level in range(5):
        mine = [p for p in pool if p.difficulty == level]
        assert {p.columns["form"] for p in mine} == set(FORMS), level
        assert 6 <= sum(len(p.prompt.split()) for p in mine) / len(mine) <= 8.5, level
    # a story told about other people is the same problem: one side of the split
    a = "Anna has 12 apples. She gives 5 apples to Ben. How many apples does Anna have left?"
    b = "Tom has 12 books. He gives 5 books to Sara. How many books does Tom have left?"
    assert task.split_key(a) == task.split_key(b) != task.split_key(a.replace("12", "13"))
    assert from_dict({"task": "wordmath", "model": "some/model"}).task == "wordmath"
    with pytest.raises(ConfigError, match="pretrained chat model: name one with --model"):
        from_dict({"task": "wordmath"})
