"""Optional native extension `awm_fast._C` (csrc/): the fused ops in C++ (CPU) and CUDA.

Everything else about the package is in pyproject.toml. The extension is built with torch.utils.cpp_extension:
a CUDAExtension when the installed torch has CUDA and nvcc is found, a CppExtension otherwise. It is skipped,
with a one-line notice, when AWM_FAST_NO_EXT=1, when torch is not importable in the build environment (pip's
build isolation hides the venv's torch: install with `pip install --no-build-isolation -e .`, as the Makefile
does), when no C++ compiler is found, or when compiling fails; the ops then fall back to Triton/torch. A failed
compile writes its error to build/awm_fast_native_build.log (BUILD_LOG); under CI the test suite fails on a
missing extension and shows that file (tests/ops/test_native_required.py).
AWM_FAST_NATIVE_ARCH=1 adds -march=native (faster CPU loops, a binary for this machine only).
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import traceback
from pathlib import Path

from setuptools import setup

SOURCES = ["csrc/ops.cpp", "csrc/cpu_kernels.cpp"]
CUDA_SOURCES = ["csrc/cuda_kernels.cu"]
CUDA_ARCHS = ("80", "90")
BUILD_LOG = Path(__file__).resolve().parent / "build" / "awm_fast_native_build.log"


def notice(msg: str) -> None:
    print(f"awm-fast: {msg}", file=sys.stderr)


def compiler_found(env=os.environ, which=shutil.which) -> str | None:
    """The C++ compiler cpp_extension will call ($CXX if set, else the interpreter's CXX, c++ or g++), if present."""
    explicit = env.get("CXX")
    for cand in [explicit] if explicit else [sysconfig.get_config_var("CXX"), "c++", "g++"]:
        if cand and which(cand.split()[0]):
            return cand.split()[0]
    return None


def extension_plan(env=os.environ, which=shutil.which) -> tuple[str | None, str]:
    """("cuda" | "cpp" | None, why): what to build, and a one-line reason."""
    if env.get("AWM_FAST_NO_EXT", "").strip() == "1":
        return None, "AWM_FAST_NO_EXT=1: native extension skipped"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, ("torch is not importable here (pip build isolation?): native extension skipped; "
                      "use `pip install --no-build-isolation -e .`")
    cxx = compiler_found(env, which)
    if cxx is None:
        return None, "no C++ compiler found: native extension skipped (ops use Triton/torch)"
    if torch.version.cuda and cpp_extension.CUDA_HOME and env.get("AWM_FAST_NO_CUDA_EXT", "") != "1":
        return "cuda", f"building awm_fast._C with CUDA {torch.version.cuda} ({cxx})"
    return "cpp", f"building awm_fast._C for CPU ({cxx})"


def extensions(kind: str | None):
    if kind is None:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"] + (["-march=native"] if os.environ.get("AWM_FAST_NATIVE_ARCH") == "1" else [])
    args = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if kind == "cuda":
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        args["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", *gencode]
        args["extra_compile_args"]["cxx"].append("-DAWM_FAST_WITH_CUDA")
        ext = CUDAExtension("awm_fast._C", SOURCES + CUDA_SOURCES, **args)
    else:
        ext = CppExtension("awm_fast._C", SOURCES, **args)

    class OptionalBuild(BuildExtension):
        """A failed compile leaves the package installable (a notice instead of an error)."""

        def run(self):
            BUILD_LOG.unlink(missing_ok=True)
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  any compiler failure: fall back, say so in one line
                BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
                BUILD_LOG.write_text(f"awm_fast._C ({kind}) failed to build; the compiler's own messages: `make ext` "
                                     f"(setup.py build_ext --inplace) prints them.\n{traceback.format_exc()}")
                notice(f"native extension not built ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                       f"details in {BUILD_LOG}")

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=bool(shutil.which("ninja")))}


if __name__ == "__main__":
    kind, why = extension_plan()
    notice(why)
    ext_modules, cmdclass = extensions(kind)
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
