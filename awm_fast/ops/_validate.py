"""Argument checks shared by the public ops: one clear ValueError/TypeError naming the argument.

The checks read shapes, dtypes and devices only: never a tensor's values, which would copy them to the host and
synchronise the stream on every call. Value checks (e.g. non-finite advantages) run only with the debug switch
AWM_FAST_DEBUG_CHECKS=1 (outside torch.compile traces); without it a NaN input shows up as a NaN loss, which
the trainer's non-finite guard catches.
"""
from __future__ import annotations

import os

import torch

DEBUG_ENV = "AWM_FAST_DEBUG_CHECKS"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {x.dtype}")


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    devices = {n: t.device for n, t in named.items() if isinstance(t, torch.Tensor)}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {first_name} is on {first}: all tensors must share one device")
    return first


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def check_per_row(name: str, x: torch.Tensor, rows: int) -> None:
    if x.dim() != 1 or x.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},) (one value per row), got {tuple(x.shape)}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def as_per_row(name: str, value, rows: int, device: torch.device) -> torch.Tensor:
    """A python float or a 0-d / (rows,) tensor -> float32 tensor of shape (rows,)."""
    if isinstance(value, torch.Tensor):
        check_float(name, value)
        if value.dim() == 0:
            value = value.reshape(1).expand(rows)
        check_per_row(name, value, rows)
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}")
        return value
    if isinstance(value, (int, float)):
        return torch.full((rows,), float(value), device=device, dtype=torch.float32)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def debug_checks() -> bool:
    """The strict value checks are on: AWM_FAST_DEBUG_CHECKS=1 (read per call) and not inside a compile trace."""
    return not torch.compiler.is_compiling() and os.environ.get(DEBUG_ENV, "").strip() == "1"


def check_finite(name: str, x: torch.Tensor) -> None:
    """Under `debug_checks()` only (it syncs): x holds no NaN or inf."""
    if debug_checks() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain NaN or inf")
