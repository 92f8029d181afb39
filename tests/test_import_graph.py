"""The import graph of awm_fast/ (every import, also the lazy ones inside functions and those under
`if TYPE_CHECKING:`): no cycle between modules, none between packages (top-level modules count as their own
node), and every import goes down the layers (LAYERS, top first):

    cli > commands > train > algorithms, rewards > tasks > families > sampling > models > ops > kernels
        > the bottom: the package's __init__, config, configs, env, logs, state_file, prompt_sets

A task builds on its family (tasks/digits.py: families/digits.py's model, plus the task's classifier), and the
families read their time grids from sampling/timesteps.py, hence tasks > families > sampling. Within the bottom layer a module
may import another (prompt_sets -> config); the cycle tests keep that one way.
"""
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


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str], *, type_checking: bool = True) -> set[str]:
    """awm_fast modules imported anywhere in `tree` (resolved to the deepest known module); with
    type_checking=False, not those under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and _type_checking(node):
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


LAYERS = (  # top first; a package imports only packages of a lower layer (the bottom layer: also its own)
    {"awm_fast.cli"},
    {"awm_fast.commands"},
    {"awm_fast.train"},
    {"awm_fast.algorithms", "awm_fast.rewards"},
    {"awm_fast.tasks"},
    {"awm_fast.families"},
    {"awm_fast.sampling"},
    {"awm_fast.models"},
    {"awm_fast.ops"},
    {"awm_fast.kernels"},
    {"awm_fast", "awm_fast.config", "awm_fast.configs", "awm_fast.env", "awm_fast.logs", "awm_fast.state_file",
     "awm_fast.prompt_sets"},
)


def _layer(package: str) -> int:
    """0 for the top layer; a package of no layer fails (a new package needs its place in LAYERS)."""
    for depth, layer in enumerate(LAYERS):
        if package in layer:
            return depth
    raise AssertionError(f"{package} has no layer: add it to LAYERS in tests/test_import_graph.py")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import `module -> target` whose target package is not in a lower layer (bottom: not in a higher one)."""
    bottom = len(LAYERS) - 1
    bad = []
    for module, targets in sorted(graph.items()):
        src = _layer(_package(module))
        for target in sorted(targets):
            dst = _layer(_package(target))
            if _package(target) != _package(module) and not (dst > src or dst == src == bottom):
                bad.append(f"{module} -> {target}")
    return bad


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


def test_imports_go_down_the_layers():
    bad = _upward(import_graph())
    assert bad == [], "imports from a layer to one not below it:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    for package in {_package(m) for m in import_graph()}:
        _layer(package)


def test_layer_check_sees_an_upward_import():
    assert _upward({"awm_fast.models.load": {"awm_fast.families"}}) == ["awm_fast.models.load -> awm_fast.families"]
    assert _upward({"awm_fast.config": {"awm_fast.sampling.timesteps"}}) == [
        "awm_fast.config -> awm_fast.sampling.timesteps"]
    assert _upward({"awm_fast.algorithms.awm": {"awm_fast.rewards"}}) == [
        "awm_fast.algorithms.awm -> awm_fast.rewards"]  # one layer: neither imports the other
    assert _upward({"awm_fast.families.sd3": {"awm_fast.models.policy", "awm_fast.config"},
                    "awm_fast.prompt_sets": {"awm_fast.config"}}) == []


def test_graph_sees_lazy_and_relative_imports():
    lazy = ast.parse("def f():\n    from awm_fast.models.lora import EMA\n    import awm_fast.env\n")
    assert _imports(lazy, "awm_fast.x", False, {"awm_fast.models.lora", "awm_fast.env"}) == {
        "awm_fast.models.lora", "awm_fast.env"}
    relative = ast.parse("from .lora import EMA\nfrom . import policy\n")
    assert _imports(relative, "awm_fast.models.adapt", False,
                    {"awm_fast.models", "awm_fast.models.lora", "awm_fast.models.policy"}) == {
        "awm_fast.models.lora", "awm_fast.models.policy"}
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from awm_fast.config import Config\n")
    assert _imports(hidden, "awm_fast.x", False, {"awm_fast.config"}, type_checking=False) == set()
    assert _imports(hidden, "awm_fast.x", False, {"awm_fast.config"}) == {"awm_fast.config"}  # counted by default
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
