"""The code's shape, in prepo/ and prepo_kernels/: no import cycles (an import inside a function
counts: it runs when the function does), no function over 80 lines and no class over 200, the
configuration a leaf (it imports registries and errors, nothing of the trainer), and PREPO's
signals import nothing of the trainer's config, tasks or rollout."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prepo", "prepo_kernels")
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 200
# classes over the limit, each with the reason it stays for now
LONG_CLASSES = {
    "prepo/integrations/trl.py:PrepoGRPOTrainer": "TRL's GRPOTrainer hooks; being reworked with the fused GRPO loss",
}
# what the configuration may import: the registries its options are checked against, and its errors
CONFIG_IMPORTS = ("prepo.errors", "prepo.signals", "prepo.tasks", "prepo_kernels.backends.registry")


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
    """The modules of PACKAGES that ``name`` imports, wherever the import stands (module level,
    under ``if`` / ``try``, inside a function or class), except under ``if TYPE_CHECKING`` (type
    annotations, never run)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
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


def test_imports_inside_functions_count(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import t\n"
                      "def f():\n    if True:\n        from p import a\nclass C:\n    def g(self):\n        import p.b\n")
    assert _imports("p.m", sample, {"p.a", "p.b", "p.t"}) == {"p.a", "p.b"}


def _config_reaches_up(graph: dict[str, set[str]]) -> set[str]:
    """The modules prepo.config imports beyond CONFIG_IMPORTS."""
    return {m for m in graph["prepo.config"] if not any(m == a or m.startswith(a + ".") for a in CONFIG_IMPORTS)}


def test_config_is_a_leaf():
    graph = _graph()
    assert graph["prepo.config"] and not _config_reaches_up(graph), _config_reaches_up(graph)
    assert not _config_reaches_up({"prepo.config": {"prepo.errors", "prepo.tasks.base"}})
    assert _config_reaches_up({"prepo.config": {"prepo.errors", "prepo.vllm_engine"}}) == {"prepo.vllm_engine"}


def test_signals_import_nothing_of_config_tasks_or_rollout():
    graph = _graph()
    for name in graph:
        if name.startswith("prepo.signals"):
            bad = {m for m in graph[name] if m.split(".")[:2] in (["prepo", x] for x in ("config", "tasks", "rollout"))}
            assert not bad, f"{name} imports {bad}"


def _too_long(path: Path, kinds: tuple, limit: int) -> list[str]:
    """``path:name (n lines)`` of each definition of ``kinds`` in ``path`` over ``limit`` lines."""
    tree = ast.parse(path.read_text())
    where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
    return [f"{where}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, kinds) and n.end_lineno - n.lineno + 1 > limit]


def _long_functions(path: Path) -> list[str]:
    return _too_long(path, (ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)


def _long_classes(path: Path) -> list[str]:
    return _too_long(path, (ast.ClassDef,), MAX_CLASS_LINES)


def _sources() -> list[Path]:
    return sorted(_modules().values())


def test_no_function_over_80_lines():
    long = [f for p in _sources() for f in _long_functions(p)]
    assert not long, long


def test_no_class_over_200_lines():
    long = [c for p in _sources() for c in _long_classes(p)]
    assert not [c for c in long if c.split(" (")[0] not in LONG_CLASSES], long
    assert all(any(c.startswith(k + " (") for c in long) for k in LONG_CLASSES)   # the list holds no stale entry


@pytest.mark.parametrize("body_lines, too_long", [(MAX_FUNCTION_LINES - 1, False), (MAX_FUNCTION_LINES, True)])
def test_function_length_check_can_fail(tmp_path, body_lines, too_long):
    sample = tmp_path / "f.py"
    sample.write_text("class C:\n    def f(self):\n" + "        x = 1\n" * body_lines)
    assert bool(_long_functions(sample)) == too_long


@pytest.mark.parametrize("body_lines, too_long", [(MAX_CLASS_LINES - 1, False), (MAX_CLASS_LINES, True)])
def test_class_length_check_can_fail(tmp_path, body_lines, too_long):
    sample = tmp_path / "c.py"
    sample.write_text("class C:\n" + "    x = 1\n" * body_lines)
    assert bool(_long_classes(sample)) == too_long
