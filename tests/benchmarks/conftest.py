import json

import pytest

from benchmarks import step_time


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One `--quick --tiny` run (kernels and phases of both tiny models) on the CPU, shared by the harness tests;
    returns (result, JSON read back, out dir)."""
    out = tmp_path_factory.mktemp("step_time")
    result = step_time.main(["--quick", "--tiny", "--device", "cpu", "--out", str(out)])
    return result, json.loads((out / "step_time_cpu_tiny.json").read_text()), out
