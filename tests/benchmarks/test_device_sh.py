"""benchmarks/device.sh's plan with a stub python that records its calls (no install, no measurement): the stage
order, no extension build, the install from the carried wheels, at most 8 files back, every stage's files packed
after it, and a failing or overrunning stage that does not stop the plan."""
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUB = r"""#!/usr/bin/env bash
echo "$* | NO_EXT=${AWM_FAST_NO_EXT:-} PYTHONPATH=${PYTHONPATH:-}" >>"$STUB_LOG"
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "benchmarks.smoke" ]; then
    while [ $# -gt 0 ]; do [ "$1" = "--json" ] && echo '{"checks": []}' >"$2"; shift; done; exit 0
fi
if [ "${1:-}" = "benchmarks/step_time.py" ]; then
    out= tag=
    while [ $# -gt 0 ]; do case "$1" in --out) out=$2;; --tag) tag=$2;; esac; shift; done
    if [ "$tag" = "${STUB_SLEEP:-}" ]; then  # one phase measured, then cut at the stage's limit
        echo '{"variant": "fast", "phase": "rollout", "status": "ok"}' >"$out/step_time_${tag}_rows.jsonl"; sleep 60
    fi
    echo '{}' >"$out/step_time_$tag.json"; echo "# $tag" >"$out/step_time_$tag.md"
    [ "$tag" = "${STUB_FAIL:-}" ] && exit 1
fi
exit 0
"""


def _run(tmp_path, plan="core", **env):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    full = {**os.environ, "WHEEL_DIR": str(tmp_path / "no_wheels"), "PY": str(stub), "STUB_LOG": str(log), "OUT": str(out), "SITE": str(tmp_path / "site"),
            "RUN": str(tmp_path / "run"), **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "run", plan], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    stages = [line.split()[0:2] for line in (tmp_path / "run" / "stages.txt").read_text().splitlines()]
    return proc, out, log.read_text().splitlines(), dict(stages)


def _archive(out: Path) -> set[str]:
    with tarfile.open(out / "step_time_core.tgz") as tar:
        return {Path(n).name for n in tar.getnames()}


def test_core_plan_runs_its_stages_in_order_from_the_carried_wheels(tmp_path):
    wheels = tmp_path / "whl"  # names only: the stub's pip reads nothing
    wheels.mkdir()
    for name in ("setuptools-80.9.0-py3-none-any.whl", "diffusers-0.42.1-py3-none-any.whl"):
        (wheels / name).write_text("stub")
    proc, out, calls, stages = _run(tmp_path, WHEEL_DIR=str(wheels))
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert list(stages) == ["install", "smoke", "fast_eager", "baseline", "fast", "kernels", "shared"]
    assert set(stages.values()) == {"status=ok"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.name for p in files} == {"device_core.log", "smoke.json", "step_time_core.tgz"}
    assert {f"step_time_{t}.json" for t in ("fast_eager", "baseline", "fast", "shared", "kernels")} <= _archive(out)
    # the install: the carried wheels (setuptools >= 77 among them) into SITE, first on PYTHONPATH, then the editable
    # install without the extension; no build anywhere
    assert any(c.startswith("-m pip install") and "--target" in c and "setuptools-" in c for c in calls)
    editable = [c for c in calls if c.startswith("-m pip install") and " -e ." in c]
    assert editable and "NO_EXT=1" in editable[0] and f"PYTHONPATH={tmp_path / 'site'}" in editable[0]
    assert not any("setup.py" in c or "build_ext" in c for c in calls)
    harness = [c for c in calls if c.startswith("benchmarks/step_time.py")]
    # the fast path in eager blocks and the baseline first, then the compiled fast path: both sides of the ratio
    # are measured before the cold compile starts; only the phases the preset runs
    assert "--variants=-compile_blocks" in harness[0] and "--variants baseline" in harness[1]
    assert "--variants fast " in harness[2] and all("--phases preset" in c for c in harness[:3])
    assert "--only kernels --min-mb 64" in harness[3]
    assert "--variants=-shared_batch --phases train" in harness[4]
    assert all("--budget-s" in c and "--device cpu" not in c for c in harness)


def test_a_failing_stage_does_not_stop_the_plan(tmp_path):
    proc, out, _, stages = _run(tmp_path, STUB_FAIL="baseline", DRY_RUN="1")
    assert proc.returncode == 0
    assert stages["baseline"] == "status=failed" and stages["fast"] == stages["kernels"] == "status=ok"
    assert "step_time_kernels.json" in _archive(out)


def test_an_overrunning_stage_is_cut_and_what_was_done_comes_back(tmp_path):
    proc, out, calls, stages = _run(tmp_path, STUB_SLEEP="fast", TOTAL_S="7", PACK_RESERVE_S="1", MIN_STAGE_S="2",
                                    DRY_RUN="1")
    assert stages["baseline"] == "status=ok" and stages["fast"] == "status=timeout"
    assert stages["shared"] == stages["kernels"] == "status=not-run"
    assert {"step_time_fast_eager.json", "step_time_baseline.json"} <= _archive(out)
    # the cut stage's finished phase comes back in the archive
    with tarfile.open(out / "step_time_core.tgz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("step_time_fast_rows.jsonl"))
        assert b'"phase": "rollout"' in tar.extractfile(member).read()
    # the dry run: inductor on the CPU in the harness (--compile) and in the smoke test
    assert all("--device cpu --tiny --compile" in c for c in calls if c.startswith("benchmarks/step_time.py"))
    assert any("benchmarks.smoke" in c and "--compile-backend inductor" in c for c in calls)


def test_rest_plan_measures_the_issue_27_levers_first(tmp_path):
    """The FP8 and merged-LoRA rows, in --quick as the core call's fast row, before the toggles."""
    proc, _, calls, stages = _run(tmp_path, "rest", DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout[-2000:]
    harness = [c for c in calls if c.startswith("benchmarks/step_time.py")]
    assert "--variants +fp8,+merged_lora" in harness[0] and "--quick" in harness[0] and "--tag levers" in harness[0]
    assert "--variants toggles" in harness[1]
    assert stages["levers"] == stages["toggles"] == "status=ok"
