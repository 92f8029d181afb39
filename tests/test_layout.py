"""Package layout: the Triton kernels live at the repository root (kernels/) and import as awm_fast.kernels, in
this checkout, from an editable install and from a built wheel (never as a top-level `kernels`); pyproject.toml
lists every package; no production module imports test or benchmark code."""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import awm_fast

ROOT = Path(awm_fast.__file__).parent
REPO = ROOT.parent
KERNEL_FILES = {"awm_loss.py", "sde_step.py", "build_check.py"}  # no __init__.py: see awm_fast/__init__.py


def _imported_top_levels(tree: ast.AST) -> set[str]:
    """First components of every absolute import in `tree`, the lazy ones inside functions included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def _origin(sys_path: list[str], module: str, *, drop_editable_finders: bool = False, finder: str | None = None) -> str:
    """The file `module` imports from in a fresh interpreter with `sys_path` first (no PYTHONPATH, another cwd);
    optionally with the venv's editable finders removed and the editable finder in the file `finder` installed."""
    code = ("import importlib, importlib.util, sys\n"
            f"sys.path[:0] = {sys_path!r}\n"
            + ("sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', ''))]\n"
               if drop_editable_finders else "")
            + ("spec = importlib.util.spec_from_file_location('built_finder', sys.argv[1])\n"
               "finder = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(finder)\nfinder.install()\n"
               if finder else "")
            + f"print(importlib.util.find_spec({module!r}).origin)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, *([finder] if finder else [])], capture_output=True, text=True,
                          env=env, cwd=sys_path[0], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _build_copy(tmp_path: Path) -> Path:
    """The files a build reads, copied (the builds leave build/ and *.egg-info there, not in the repository)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("awm_fast", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    return src


def test_kernels_live_at_the_root_and_import_as_awm_fast_kernels():
    assert {p.name for p in (REPO / "kernels").glob("*.py")} == KERNEL_FILES
    assert not (ROOT / "kernels").exists()
    spec = importlib.util.find_spec("awm_fast.kernels.awm_loss")
    assert spec is not None and Path(spec.origin) == REPO / "kernels" / "awm_loss.py"


def test_root_kernels_shadow_no_installed_kernels_package():
    """kernels/ has no __init__.py, so with the checkout first on sys.path (pytest, `python -m` from the root) an
    installed regular package named `kernels` (Hugging Face hub kernels, imported by transformers) still wins."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    origin = _origin([str(REPO)], "kernels")
    assert origin in ("None", "") or Path(origin).parent != REPO / "kernels", origin


def test_pyproject_lists_every_package_and_maps_the_kernels():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    under = {".".join(p.parent.relative_to(REPO).parts) for p in ROOT.rglob("__init__.py")}
    assert set(tool["packages"]) == under | {"awm_fast.kernels"}
    assert tool["package-dir"] == {"awm_fast.kernels": "kernels"}


def test_wheel_and_editable_install_import_the_kernels_as_awm_fast_kernels(tmp_path):
    """A built wheel holds awm_fast/kernels/*.py and no top-level kernels/; an editable install maps
    awm_fast.kernels to the repository's kernels/. Both built without the native extension (AWM_FAST_NO_EXT=1):
    its build is tests/ops/test_native_build.py's."""
    src, wheels, editable = _build_copy(tmp_path), tmp_path / "wheels", tmp_path / "editable"
    env = {**os.environ, "AWM_FAST_NO_EXT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, env=env, timeout=300)
    (wheel,) = wheels.glob("awm_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.removeprefix("awm_fast/kernels/") for n in names if n.startswith("awm_fast/kernels/")} == KERNEL_FILES
    assert {n.split("/")[0] for n in names} == {"awm_fast", wheel.name.split("-py")[0] + ".dist-info"}
    assert "awm_fast/families/tiny/__init__.py" in names and "awm_fast/configs/digits.yaml" in names
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    assert Path(_origin([str(unpacked)], "awm_fast.kernels.sde_step")) == unpacked / "awm_fast/kernels/sde_step.py"

    code = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(editable)], check=True, env=env, cwd=src,
                         capture_output=True, text=True, timeout=300).stdout.strip().splitlines()[-1]
    files = tmp_path / "editable_files"
    zipfile.ZipFile(editable / out).extractall(files)
    (finder,) = files.glob("__editable___*_finder.py")
    mapping = ast.literal_eval(next(line.partition("=")[2] for line in finder.read_text().splitlines()
                                    if line.startswith("MAPPING")))
    assert mapping == {"awm_fast": str(src / "awm_fast"), "awm_fast.kernels": str(src / "kernels")}
    origin = _origin([str(files)], "awm_fast.kernels.awm_loss", drop_editable_finders=True, finder=str(finder))
    assert Path(origin) == src / "kernels" / "awm_loss.py"


def test_production_code_imports_no_test_or_benchmark_module():
    production = [*ROOT.rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
    offenders = {str(p.relative_to(REPO)): sorted(found) for p in production
                 if (found := _imported_top_levels(ast.parse(p.read_text())) & {"tests", "benchmarks", "kernels"})}
    assert offenders == {}
    seen = _imported_top_levels(ast.parse("def f():\n    from tests.ops import reference_op\nimport benchmarks.x\n"))
    assert {"tests", "benchmarks"} <= seen
