"""The import graph of awm_fast/ (every import, also the lazy ones inside functions; `if TYPE_CHECKING:`
blocks excluded): no cycle between modules, and none between packages (top-level modules count as their own
node), so each package only imports packages below it."""
from __future__ import annotations

import ast
from pathlib import Path

import awm_fast

ROOT = Path(awm_fast.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("awm_fast", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """awm_fast modules imported anywhere in `tree` (resolved to the deepest known module)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("awm_fast.") and name != module and not module.startswith(name + "."):
                found.add(name)  # a module's own packages are initialised before it anyway: no edge
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", set(files)) for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_import_cycle():
    cycle = _cycle(import_graph())
    if cycle is not None:
        raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_no_package_import_cycle():
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(_package(module), set()).update(_package(t) for t in targets if _package(t) != _package(module))
    cycle = _cycle(packages)
    if cycle is not None:
        raise AssertionError("package import cycle: " + " -> ".join(cycle))


def test_graph_sees_lazy_and_relative_imports():
    lazy = ast.parse("def f():\n    from awm_fast.models.lora import EMA\n    import awm_fast.env\n")
    assert _imports(lazy, "awm_fast.x", False, {"awm_fast.models.lora", "awm_fast.env"}) == {
        "awm_fast.models.lora", "awm_fast.env"}
    relative = ast.parse("from .lora import EMA\nfrom . import policy\n")
    assert _imports(relative, "awm_fast.models.adapt", False,
                    {"awm_fast.models", "awm_fast.models.lora", "awm_fast.models.policy"}) == {
        "awm_fast.models.lora", "awm_fast.models.policy"}
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from awm_fast.config import Config\n")
    assert _imports(hidden, "awm_fast.x", False, {"awm_fast.config"}) == set()
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
