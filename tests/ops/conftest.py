"""Fixtures for the Triton tests: device choice, the Triton interpreter on CPU, NaN-poisoned buffers, tiny tiles.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
anything imports triton); with CUDA the same tests run on the GPU.
"""
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA; it is missing")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poison_and_tiny_tiles(monkeypatch):
    """Every launcher buffer starts as NaN (so an unwritten element shows up), and tiles are 16 values with
    about 8 programs per launch, so tiny rows still take several chunks and several tiles per chunk."""
    from awm_fast.kernels import awm_loss as common

    monkeypatch.setattr(common, "empty", lambda shape, device, dtype: torch.full(shape, math.nan, device=device,
                                                                                   dtype=dtype))
    monkeypatch.setattr(common, "MAX_BLOCK", 16)
    monkeypatch.setattr(common, "TARGET_PROGRAMS", 8)
