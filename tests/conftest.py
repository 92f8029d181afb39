import os

import pytest
import torch

# Without CUDA the Triton kernel tests (tests/ops) run in the Triton interpreter. The variable must be set before
# anything imports triton (diffusers does), hence here rather than in tests/ops/conftest.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AWM_FAST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator per test with a per-test seed, so inputs are random but reproducible."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("AWM_FAST_RANDOM_SEED") else 1234
    return torch.Generator().manual_seed(seed)
