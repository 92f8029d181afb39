"""A harness run killed with SIGKILL in the middle of a variant (as device.sh's `timeout -k` cuts a stage at its
limit) leaves every phase it finished: in the rows file (appended and flushed per row) and in the JSON, which is
rewritten atomically after each row and merges into a report."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import step_time

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_killed_after_its_first_phase_keeps_that_row(tmp_path):
    out = tmp_path / "run"
    rows_file, json_file = out / "step_time_cpu_tiny_sd35m_rows.jsonl", out / "step_time_cpu_tiny_sd35m.json"
    proc = subprocess.Popen([sys.executable, "benchmarks/step_time.py", "--quick", "--tiny", "--device", "cpu",
                             "--only", "phases", "--model", "sd35m", "--variants", "fast,baseline", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if json_file.is_file() and any(r["status"] == "ok" for r in json.loads(json_file.read_text()).get(
                    "phases", [])):  # a whole file or none: written atomically
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    measured = [r for r in rows if r["status"] == "ok"]
    assert measured and measured[0]["variant"] == "fast" and measured[0]["images_per_s"] > 0
    saved = json.loads(json_file.read_text())
    kept = {(r["variant"], r["phase"]) for r in saved["phases"] if r["status"] == "ok"}
    assert (measured[0]["variant"], measured[0]["phase"]) in kept
    assert kept <= {(r["variant"], r["phase"]) for r in measured}  # the JSON never runs ahead of the rows file
    # a kill inside write_atomic leaves that write's temporary file (no code runs on SIGKILL): only the killed
    # process's own, beside whole published files, never a partial file under a published name
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert all(n.startswith(".step_time") and n.endswith(f".{proc.pid}.tmp") for n in leftovers), leftovers
    merged = step_time.main(["--merge", str(json_file), "--out", str(tmp_path / "m")])
    assert {(r["variant"], r["phase"]) for r in merged["phases"] if r["status"] == "ok"} == kept


def test_a_fast_path_fallback_line_is_kept_in_the_rows_measured_after_it(monkeypatch):
    """The trainer's fast path falls back (compile, CUDA-graph capture, attention probe) with one warning and runs
    on: the harness rows measured after it carry that line, so an 'ok' fast row that ran eager says so."""
    import logging

    import torch

    from benchmarks import _models, _phases

    real = _phases.Bench.policy

    def policy_then_fallback(self, variant, log=print):
        built = real(self, variant, log=log)
        logging.getLogger("awm_fast.models.compile").warning(
            "[compile] off: JointTransformerBlock failed to compile (planted); the transformer's blocks run eager")
        return built

    monkeypatch.setattr(_phases.Bench, "policy", policy_then_fallback)
    bench = _phases.Bench(_models.model_spec("tiny"), torch.device("cpu"))
    rows = _phases.run_phases(bench, ("train",), True, False, None, {}, log=lambda *_: None, only="fast")
    (row,) = [r for r in rows if r["status"] == "ok"]
    assert "[compile] off: JointTransformerBlock failed to compile (planted)" in row["fallbacks"]
    assert not logging.getLogger("awm_fast").handlers or not any(
        isinstance(h, _phases.FallbackLines) for h in logging.getLogger("awm_fast").handlers)
