"""The autouse fixture of tests/conftest.py puts back what a test changes process-wide (GlobalState)."""
import os

import torch

from tests.conftest import SUITE_THREADS, GlobalState


def test_threads_env_dtype_attention_backend_and_dist_are_restored():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from awm_fast.train import distributed

    threads, backend, dist_before = torch.get_num_threads(), _AttentionBackendRegistry._active_backend, distributed.current()
    os.environ["AWM_FAST_STATE_CHECK"] = "kept"
    state = GlobalState()
    torch.set_num_threads(1 if threads != 1 else 2)
    os.environ["AWM_FAST_STATE_CHECK"] = "changed"
    os.environ["AWM_FAST_STATE_NEW"] = "1"
    torch.set_default_dtype(torch.float64)
    other = next(b for b in AttentionBackendName if b != backend)
    _AttentionBackendRegistry.set_active_backend(other)
    distributed._CURRENT = distributed.Dist(rank=1, world=2)
    state.restore()
    assert torch.get_num_threads() == threads
    assert os.environ["AWM_FAST_STATE_CHECK"] == "kept" and "AWM_FAST_STATE_NEW" not in os.environ
    assert torch.get_default_dtype() == torch.float32
    assert _AttentionBackendRegistry._active_backend == backend
    assert distributed.current() is dist_before
    del os.environ["AWM_FAST_STATE_CHECK"]


def test_every_test_starts_on_the_suites_thread_count():
    """run.threads=1 (tests/train) calls torch.set_num_threads(1); tests/conftest.py starts at min(2, cores) (per
    xdist worker: cores / workers)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    assert torch.get_num_threads() == SUITE_THREADS == max(1, min(2, (os.cpu_count() or 1) // workers))
