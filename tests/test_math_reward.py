"""prepo.rewards: math_reward's verdicts on hand-written cases, off the main thread, its time
limit, and loading a user's reward function."""
from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from prepo.rewards import (
    MathChecker, RewardError, compute_rewards, load_reward, math_reward, math_verify_reward,
)

# (completion, gold answer): equivalent forms score 1.0
CORRECT = [
    ("\\boxed{42}", "42"),
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{3/4}", "0.75"),
    ("\\boxed{50\\%}", "50\\%"),
    ("\\boxed{0.5}", "50\\%"),
    ("\\boxed{[1, 2)}", "[1,2)"),
    ("\\boxed{(-\\infty, 0]}", "(-\\infty,0]"),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("\\boxed{1,000}", "1000"),
    ("so \\boxed{x=5}", "5"),
    ("\\boxed{-4}", "-4"),
    ("The final answer is 7.", "7"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2"),
    ("\\boxed{10^{6}}", "1000000"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("4*5=20,3+20=23,23-2=21", "21"),
    ("\\boxed{1.50}", "\\frac{3}{2}"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("It is \\boxed{7}", "The answer is \\boxed{7}"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("$x = \\frac{-b}{2}$ so the answer is $\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{1}{\\sqrt{2}}"),
    ("We have 12 apples and 22 more, 34 in all.\n\nAnswer: 34", "34"),  # DAPO's answer format
]
# wrong but close: 0.0
WRONG = [
    ("\\boxed{0.49}", "0.5"),
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{[1,2]}", "[1,2)"),
    ("\\boxed{(1,2]}", "[1,2)"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}"),
    ("\\boxed{-42}", "42"),
    ("\\boxed{\\sqrt{3}}", "2\\sqrt{3}"),
    ("\\boxed{5\\%}", "50\\%"),
    ("\\boxed{1001}", "1000"),
    ("I first thought 42, but the answer is \\boxed{24}", "42"),
    ("", "3"),
    ("no idea", "3"),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{2}"),
    ("\\boxed{x=6}", "5"),
    ("\\boxed{10^{5}}", "1000000"),
    ("\\boxed{\\pi}", "3.14"),
    ("4*5=20,3+20=23,23-2=20", "21"),
    ("\\boxed{(x-1)^2}", "x^2+2x+1"),
    ("First 12, then 34? No.\n\nAnswer: 12", "34"),
]
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy evaluates the power: hours


@pytest.fixture(scope="module")
def patient_checker():
    """The verdict tests ask what the answer is, not how fast: a symbolic check on a loaded machine
    can pass the 5 s limit (tested on its own below) and would read as a wrong verdict."""
    import prepo.rewards

    checker, default = MathChecker(time_limit_s=60.0), prepo.rewards._checker
    prepo.rewards._checker = checker
    yield checker
    prepo.rewards._checker = default
    checker.close()


@pytest.mark.parametrize("completion,gold", CORRECT)
def test_equivalent_forms_score_one(completion, gold, patient_checker):
    assert math_reward([completion], [gold]) == [1.0]


@pytest.mark.parametrize("completion,gold", WRONG)
def test_wrong_but_close_scores_zero(completion, gold, patient_checker):
    assert math_reward([completion], [gold]) == [0.0]


# several boxes: the last is the answer (math-verify alone joins the first four into a set {5, 7})
SEVERAL_BOXES = [
    ("\\boxed{5} and also \\boxed{7}", "7", 1.0),
    ("first \\boxed{5}. Final: \\boxed{7}", "7", 1.0),
    ("\\boxed{5}, \\boxed{7}", "7", 1.0),
    ("\\boxed{\\frac{1}{2}} or rather \\boxed{\\frac{1}{3}}", "\\frac{1}{3}", 1.0),
    ("\\fbox{5} then $\\boxed{7}$", "7", 1.0),
    ("\\boxed{7} and also \\boxed{5}", "7", 0.0),
    ("\\boxed{5} and \\boxed{7}", "5, 7", 0.0),  # a multi-part answer goes in one box:
    ("\\boxed{5, 7}", "5, 7", 1.0),
]


@pytest.mark.parametrize("completion,gold,want", SEVERAL_BOXES)
def test_several_boxes_the_last_counts(completion, gold, want):
    assert math_reward([completion], [gold]) == [want]


def test_batch_matches_items_and_input_forms():
    cases = CORRECT + WRONG
    assert math_reward([c for c, _ in cases], [g for _, g in cases]) == [1.0] * len(CORRECT) + [0.0] * len(WRONG)
    assert math_reward(["\\boxed{42}", "\\boxed{0.5}"], [42, 0.5]) == [1.0, 1.0]  # numbers as gold
    chat = [[{"role": "assistant", "content": "so \\boxed{9}"}], []]  # TRL conversational completions
    assert math_reward(chat, ["9", "9"]) == [1.0, 0.0]
    assert math_verify_reward(["p"] * 2, ["\\boxed{1}", "2"], answer=["1", "1"], data_source=["a", "b"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_reward(["1", "2"], ["1"])


def _correct_and_wrong():
    return ["\\boxed{\\frac{1}{2}}", "\\boxed{[1,2)}", "\\boxed{3}"], ["0.5", "[1,2)", "4"]


def test_off_the_main_thread_correct_answers_score_one():
    """verl's bug: math-verify's signal.alarm time limit fails off the main thread and correct answers
    silently scored 0. Here a worker thread, a thread pool and a spawned process all get 1.0."""
    comps, golds = _correct_and_wrong()
    want = [1.0, 1.0, 0.0]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", math_reward(comps, golds)))
    t.start()
    t.join()
    assert result["r"] == want
    fresh = MathChecker()  # no memoized verdicts: the worker process really runs from this thread
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: fresh(comps, golds), range(2))) == [want, want]
    fresh.close()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(math_reward, comps, golds).result(timeout=120) == want


def test_time_limit_fires_off_the_main_thread():
    checker = MathChecker(time_limit_s=1.0)
    result = {}
    start = time.monotonic()
    t = threading.Thread(target=lambda: result.setdefault(
        "r", checker([PATHOLOGICAL, "\\boxed{2}", PATHOLOGICAL], ["1", "2", "1"])))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the time limit did not fire"
    assert result["r"] == [0.0, 1.0, 0.0] and checker.timeouts == 1  # the repeat is memoized
    assert time.monotonic() - start < 30
    checker.close()
    with pytest.raises(ValueError, match="positive"):
        MathChecker(time_limit_s=0)


def test_a_broken_checker_raises_and_is_counted(monkeypatch):
    checker = MathChecker()
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker cannot start
    with pytest.raises(RuntimeError, match="exited with code 1"):
        checker(["\\boxed{1}"], ["1"])
    rewards, failures = compute_rewards(lambda prompts, completions, answer: checker(completions, answer),
                                        ["p", "q"], ["1", "2"], answer=["1", "2"])
    assert rewards == [0.0, 0.0] and failures == 2


def test_load_reward(tmp_path, monkeypatch):
    assert load_reward("prepo.rewards:math_verify_reward") is math_verify_reward
    user = tmp_path / "my_reward.py"
    user.write_text("def length_reward(prompts, completions, **columns):\n"
                    "    return [float(len(c)) for c in completions]\nTHRESHOLD = 3\n")
    fn = load_reward(f"{user}:length_reward")
    assert compute_rewards(fn, ["p", "q"], ["ab", "abc"], answer=["1", "2"]) == ([2.0, 3.0], 0)
    (tmp_path / "trl_style.py").write_text(  # TRL's documented form: called by keyword
        "def accuracy(completions, answer, **kwargs):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    trl = load_reward(f"{tmp_path / 'trl_style.py'}:accuracy")
    assert compute_rewards(trl, ["p", "q"], ["1", "3"], answer=["1", "2"], data_source=["x", "y"]) == ([1.0, 0.0], 0)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_reward:length_reward")(["p"], ["abcd"]) == [4.0]
    for spec, msg in [
        ("no_colon", "expects module:function"),
        ("mod:", "expects module:function"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        (f"{tmp_path}/missing.py:f", "does not exist"),
        ("my_reward:nope", "has no attribute 'nope'"),
        ("my_reward:THRESHOLD", "is a int, not a function"),
    ]:
        with pytest.raises(RewardError, match=msg):
            load_reward(spec)
    (tmp_path / "broken_reward.py").write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency_xyz"):
        load_reward("broken_reward:f")  # a missing import inside the user's module is its own error
