"""Package layout: the Triton kernels are a subpackage of awm_fast (a plain checkout imports them), and no
production module imports test or benchmark code."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import awm_fast

ROOT = Path(awm_fast.__file__).parent
REPO = ROOT.parent


def _imported_top_levels(tree: ast.AST) -> set[str]:
    """First components of every absolute import in `tree`, the lazy ones inside functions included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_kernels_are_inside_the_package():
    spec = importlib.util.find_spec("awm_fast.kernels.awm_loss")
    assert spec is not None and Path(spec.origin).parent == ROOT / "kernels"
    assert not (REPO / "kernels").exists()


def test_production_code_imports_no_test_or_benchmark_module():
    offenders = {str(p.relative_to(REPO)): sorted(found) for p in ROOT.rglob("*.py")
                 if (found := _imported_top_levels(ast.parse(p.read_text())) & {"tests", "benchmarks"})}
    assert offenders == {}
    seen = _imported_top_levels(ast.parse("def f():\n    from tests.ops import reference_op\nimport benchmarks.x\n"))
    assert {"tests", "benchmarks"} <= seen
