"""The front door: the README's commands are CI's commands, the docs' runnable examples run, their
links resolve and the pages carry no history (that is CHANGELOG.md's job)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
RUNNABLE = "<!-- runnable -->"


def _between(text: str, begin: str, end: str) -> str:
    assert begin in text and end in text, f"markers {begin!r} / {end!r} not found"
    return text.split(begin, 1)[1].split(end, 1)[0]


def _commands(block: str) -> list[str]:
    """Shell commands of a block, one per `&&`-joined part, comments and blank lines dropped."""
    out = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "```")):
            out += [part.strip() for part in line.split("&&")]
    return out


def pip_installs(block: str) -> list[list[str]]:
    """Each `pip install` of ``block`` as its arguments, normalized: `python -m pip` -> `pip`, leading
    VAR=value assignments (MAX_JOBS: how fast, not what) and -q dropped."""
    out = []
    for cmd in _commands(block):
        words = shlex.split(cmd)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words[:3] == ["python", "-m", "pip"]:
            words = ["pip"] + words[3:]
        if words[:2] == ["pip", "install"]:
            out.append([w for w in words[2:] if w not in ("-q", "--quiet")])
    return out


def readme_install() -> str:
    return _between(README.read_text(), "<!-- install:begin -->", "<!-- install:end -->")


def ci_install() -> str:
    return _between(CI.read_text(), "# install:begin", "# install:end").split("\n", 1)[1]   # the marker's line is a comment


def test_readme_install_is_ci_quick_tier_install():
    readme, ci = pip_installs(readme_install()), pip_installs(ci_install())
    assert readme, "the README's install block has no pip install"
    assert readme == ci, f"README installs {readme}, .ci/run's quick tier {ci}: make them the same"


def test_the_comparison_sees_a_drift():
    ci = ci_install().replace('".[test,triton,trl]"', '".[test,triton,trl]" gguf')
    assert pip_installs(readme_install()) != pip_installs(ci)
    assert pip_installs("MAX_JOBS=2 python -m pip install -q x") == pip_installs("pip install x")


def test_readme_test_commands_run_in_ci_right_after_its_install():
    tests = [c for c in _commands(readme_install()) if c.startswith("python -m pytest")]
    assert tests == ["python -m pytest tests -q", "python -m pytest tests -q -m slow"]
    after = _commands(CI.read_text().split("# install:end", 1)[1])
    quick = after.index(tests[0])
    assert not pip_installs("\n".join(after[:quick])), "CI installs more before the quick tier than the README"
    assert after.index(tests[1]) > quick


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail into docs/"


def runnable_examples() -> list:
    cases = []
    for page in PAGES:
        parts = re.split(rf"^{RUNNABLE}$", page.read_text(), flags=re.M)   # the marker on a line of its own
        for i, part in enumerate(parts[1:], 1):
            code = re.match(r"\s*```python\n(.*?)\n```", part, re.S)
            assert code, f"{page.name}: {RUNNABLE} #{i} is not followed by a ```python block"
            cases.append(pytest.param(code.group(1), id=f"{page.relative_to(ROOT)}#{i}"))
    return cases


@pytest.mark.parametrize("code", runnable_examples())
def test_runnable_example(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})


def test_there_are_runnable_examples():
    assert len(runnable_examples()) >= 4


HISTORY = [
    (r"\bissues? #?\d+\b", "an issue number"),
    (r"\b(this|previous|last|next|earlier) round\b|\bround \d+\b", "a round"),
    (r"\bcommit [0-9a-f]{7,40}\b|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", "a commit hash"),
    (r"(^|[\s(])I (have|had|am|was|did|ran|measured|think)\b|\bcolleague", "a first person or a person"),
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_carry_no_history(page):
    for lineno, line in enumerate(page.read_text().splitlines(), 1):
        for pattern, what in HISTORY:
            assert not re.search(pattern, line), f"{page.name}:{lineno} has {what} (history goes to CHANGELOG.md): {line}"


def test_the_history_check_can_fail():
    bad = ["as measured in issue 20", "the previous round's kernel", "before = commit 9b97997", "I have not timed"]
    assert all(any(re.search(p, b) for p, _ in HISTORY) for b in bad)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces -> '-'."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path = page.parent / target if target else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name} links to {target}#{anchor}, a heading that does not exist"
