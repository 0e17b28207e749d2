"""The code's shape: no import cycles within prepo/ and prepo_kernels/, no function in prepo/ over
80 lines, and PREPO's signals import nothing of the trainer's config, tasks or rollout."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prepo", "prepo_kernels")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in PACKAGES (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of PACKAGES that ``name`` imports when it is loaded: its module-level imports
    (also under a top-level ``if`` / ``try``, not inside functions or ``if TYPE_CHECKING``)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None. A package importing its own submodules
    (``from . import x`` in ``__init__``) is how packages are built, not a cycle; a submodule
    importing its package back (or a sibling that does) is."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if u.startswith(v + "."):     # a module's import of its parent package is already under way
                continue
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := dfs(v)):
                return c
        state[u] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (c := dfs(node)):
            return c
    return None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40 and graph["prepo.train"]   # the graph was really built
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None   # a package and its submodule
    assert _cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": {"p.x"}}) == ["p.x", "p.y", "p.x"]


def test_signals_import_nothing_of_config_tasks_or_rollout():
    graph = _graph()
    for name in graph:
        if name.startswith("prepo.signals"):
            bad = {m for m in graph[name] if m.split(".")[:2] in (["prepo", x] for x in ("config", "tasks", "rollout"))}
            assert not bad, f"{name} imports {bad}"


def _long_functions(path: Path) -> list[str]:
    """``path:line name (n lines)`` of each function (or method) in ``path`` over the limit."""
    tree = ast.parse(path.read_text())
    return [f"{path}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_in_prepo_over_80_lines():
    long = [f for p in sorted((REPO / "prepo").rglob("*.py")) for f in _long_functions(p)]
    assert not long, long


@pytest.mark.parametrize("body_lines, too_long", [(MAX_FUNCTION_LINES - 1, False), (MAX_FUNCTION_LINES, True)])
def test_function_length_check_can_fail(tmp_path, body_lines, too_long):
    sample = tmp_path / "f.py"
    sample.write_text("class C:\n    def f(self):\n" + "        x = 1\n" * body_lines)
    assert bool(_long_functions(sample)) == too_long
