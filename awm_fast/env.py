"""The run's environment: the device, the dtype names of the config, and whether the hub may be reached.

One home for each: `pick_device` (run.device, a reward's device, the harness' --device), `DTYPES`
(model.dtype and a reward's dtype), `hub_offline` (HF_HUB_OFFLINE as huggingface_hub reads it).
"""
from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")  # run.device


def pick_device(name: str | torch.device | None, option: str = "run.device") -> torch.device:
    """"auto" (or None) -> cuda when torch sees one, else cpu; `option` names the setting in the error."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name} but torch sees no CUDA device (use {option}=cpu or auto)")
    return device


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (1, true, yes, on): load from local folders and the hub cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
