import os

import pytest
import torch

os.environ.setdefault("AWM_FAST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator per test with a per-test seed, so inputs are random but reproducible."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("AWM_FAST_RANDOM_SEED") else 1234
    return torch.Generator().manual_seed(seed)
