"""The CUDA sources compile with nvcc for sm_80 and sm_90 on a machine without a GPU (CI's CPU machines have
CUDA 13.0's nvcc). They include no torch header, so this takes seconds; the full CMake build and its ctest
are `make cmake-test`."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    cmd = ["nvcc", "-O3", "-std=c++17", "-c", str(ROOT / "csrc" / "cuda_kernels.cu"), "-o", str(tmp_path / "k.o")]
    cmd[1:1] = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-2000:]
