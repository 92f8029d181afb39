import os
import sys

import pytest
import torch

# Without CUDA the Triton kernel tests (tests/ops) run in the Triton interpreter. The variable must be set before
# anything imports triton (diffusers does), hence here rather than in tests/ops/conftest.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AWM_FAST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))
# `make test` runs the suite on pytest-xdist workers, one per core: each worker then computes on one thread (two
# each would oversubscribe the cores), and so do the command lines it starts (OMP_NUM_THREADS), so a run in this
# process and the same run in a subprocess give the same numbers; a plain `pytest` in one process uses up to two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
SUITE_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(SUITE_THREADS)
torch.set_num_threads(SUITE_THREADS)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator per test with a per-test seed, so inputs are random but reproducible."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("AWM_FAST_RANDOM_SEED") else 1234
    return torch.Generator().manual_seed(seed)


def _attention_registry():
    """diffusers' process-wide attention backend registry (`attention_backend(...)` sets it), if diffusers is loaded."""
    return getattr(sys.modules.get("diffusers.models.attention_dispatch"), "_AttentionBackendRegistry", None)


class GlobalState:
    """What a test can change process-wide, captured now and put back by `restore()`: torch's CPU thread count
    (the trainer sets run.threads), the environment (os.environ), the default dtype, diffusers' active attention
    backend (its import-time default when diffusers was first imported after the capture), and the process's Dist
    (awm_fast.train.distributed; a fresh single-process one when that module was first imported after it)."""

    def __init__(self) -> None:
        self.threads, self.env, self.dtype = torch.get_num_threads(), dict(os.environ), torch.get_default_dtype()
        registry = _attention_registry()
        self.attention = registry._active_backend if registry is not None else None
        dist_mod = sys.modules.get("awm_fast.train.distributed")
        self.dist = dist_mod._CURRENT if dist_mod is not None else None

    def restore(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if dict(os.environ) != self.env:
            os.environ.clear()
            os.environ.update(self.env)
        if torch.get_default_dtype() != self.dtype:
            torch.set_default_dtype(self.dtype)
        registry = _attention_registry()
        if registry is not None:
            active = self.attention
            if active is None:
                dispatch = sys.modules["diffusers.models.attention_dispatch"]
                active = dispatch.AttentionBackendName(dispatch.DIFFUSERS_ATTN_BACKEND)
            if registry._active_backend != active:
                registry.set_active_backend(active)
        dist_mod = sys.modules.get("awm_fast.train.distributed")
        if dist_mod is not None:
            dist_mod._CURRENT = self.dist if self.dist is not None else dist_mod.Dist()


@pytest.fixture(autouse=True, scope="module")
def _restore_global_state_per_module():
    """The same for a module: its module-scoped fixtures (a tiny pipeline whose loading sets diffusers' active
    attention backend, say) are built after this capture, so nothing they set leaks into the next module."""
    state = GlobalState()
    yield
    state.restore()


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test leaves the process as it found it (GlobalState), so that no test depends on the order."""
    state = GlobalState()
    yield
    state.restore()



# Test files that share a session-scoped fixture -> the fixture. Under `make test` (-n 2 --dist loadfile) each such
# set of files runs on one worker as one unit, so the fixture is built once, not once per worker. (xdist's
# loadgroup cannot do it under pytest 9: it renames the test ids through an attribute pytest 9 no longer reads.)
# A file using one of these fixtures that is not listed here stops the collection (below).
SHARED_SESSION_FIXTURES = {
    "tests/benchmarks/test_step_time.py": "tiny_run",
    "tests/benchmarks/test_step_time_budget.py": "tiny_run",
    "tests/benchmarks/test_merge.py": "tiny_run",
}


def pytest_collection_modifyitems(config, items):
    shared = set(SHARED_SESSION_FIXTURES.values())
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        for name in shared.intersection(getattr(item, "fixturenames", ())):
            if SHARED_SESSION_FIXTURES.get(path) != name:
                raise pytest.UsageError(f"{path} uses the session fixture {name}: list it in tests/conftest.py's "
                                        "SHARED_SESSION_FIXTURES so that one worker builds it once")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s scheduling (-n 2 --dist loadfile): each file's tests on one worker (its module fixtures built
    once), and the files of one SHARED_SESSION_FIXTURES fixture on one worker together. Other --dist modes keep
    xdist's own scheduling."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileOrSharedFixture(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_SESSION_FIXTURES.get(path, path)

    return FileOrSharedFixture(config, log)
