"""Backend choice for the fused ops.

"auto" picks, per device, the backend measured fastest by benchmarks/step_time.py (kernel section) among those
present: see AUTO_ORDER. The environment variable AWM_FAST_BACKEND (torch | triton | cpp | cuda) overrides
"auto" for the whole process. "cpp" (CPU tensors) and "cuda" (CUDA tensors) are the native ops of csrc/
(`awm_fast.ops.native_backend`), present when the extension awm_fast._C was built.

Which backends are present is decided once, when this module is imported (the native library is loaded then,
unless AWM_FAST_NO_EXT=1), into plain Python constants: `resolve_backend` reads only those and the environment,
so it runs inside a torch.compile trace (fullgraph) from the very first call, before any eager call.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
ENV_VAR = "AWM_FAST_BACKEND"
# "auto": the first backend present for the device.
# CPU: cpp before torch. `benchmarks/step_time.py --quick --only kernels` on the project's 2-core CPU
# (float32 inputs, median ms, torch = the float64 eager reference; 2026-11-22):
#     shape (rows x latent)        awm_loss fwd+bwd     sde log-prob fwd+bwd   sde sample (cpp: in-kernel noise)
#     digits 160 x 1x8x8           torch 0.79  cpp 0.37   torch 0.52  cpp 0.24    torch 0.38  cpp 0.16
#     SD3.5-M 6 x 16x64x64         torch 7.20  cpp 0.89   torch 10.0  cpp 0.61    torch 9.12  cpp 6.23
#     SD3.5-M 18 x 16x64x64        torch 17.9  cpp 2.79   torch 21.6  cpp 2.05    torch 13.8  cpp 17.8
# The one loss for cpp, in-kernel Philox sampling at 1.2M values (scalar logf/cosf per value), is not what
# "auto" runs: with generator noise (what the trainer passes) cpp sampling took 5.3 ms there against torch's
# 24 ms (torch.randn alone 3.4 ms).
# CUDA: triton before cuda; no GPU was available to measure them against each other, so the Triton kernels
# stay first until the harness says otherwise on a GPU.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


def _probe() -> tuple[bool, dict[str, bool]]:
    """(triton importable, {device type: native kernels loaded}), probed eagerly, outside any trace."""
    from awm_fast.ops import native_backend

    return importlib.util.find_spec("triton") is not None, {d: native_backend.available(d) for d in ("cpu", "cuda")}


_TRITON, _NATIVE = _probe()


def triton_available() -> bool:
    return _TRITON


def native_available(device_type: str) -> bool:
    """Native kernels for "cpu" / "cuda" tensors are loaded (False for any other device type)."""
    return _NATIVE.get(device_type, False)


def backend_present(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return device_type == "cuda" and triton_available()
    if backend == "cpp":
        return device_type == "cpu" and native_available("cpu")
    if backend == "cuda":
        return device_type == "cuda" and native_available("cuda")
    return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs: "torch", "triton", "cpp" or "cuda"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced:
            if forced not in BACKENDS[1:]:
                raise ValueError(f"{ENV_VAR}={forced!r} is not one of {BACKENDS[1:]}")
            backend = forced
        else:
            order = AUTO_ORDER.get(device.type, ("torch",))
            backend = next(b for b in order if backend_present(b, device.type))
            if backend != order[0] and order[0] in ("cpp",) and not torch.compiler.is_compiling():
                from awm_fast.ops import native_backend

                native_backend.notice_fallback(device.type, backend)
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
    if backend in ("cpp", "cuda"):
        from awm_fast.ops import native_backend

        if device.type != ("cpu" if backend == "cpp" else "cuda"):
            raise ValueError(f"backend={backend!r} runs on {'CPU' if backend == 'cpp' else 'CUDA'} tensors, "
                             f"got a {device.type} tensor")
        if not native_available(device.type):
            why = native_backend.why_unavailable() or "the extension was built without CUDA"
            raise ValueError(f"backend={backend!r} needs the native extension awm_fast._C: {why}")
    return backend
