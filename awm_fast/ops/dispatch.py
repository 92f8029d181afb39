"""Backend choice for the fused ops.

"auto" picks the fused Triton kernels for CUDA tensors (when triton imports) and the torch reference on
CPU. The environment variable AWM_FAST_BACKEND (torch | triton) overrides "auto" for the whole process.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "AWM_FAST_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs: "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced:
            if forced not in BACKENDS[1:]:
                raise ValueError(f"{ENV_VAR}={forced!r} is not one of {BACKENDS[1:]}")
            backend = forced
        else:
            backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
    return backend
