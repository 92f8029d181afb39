"""Every Triton kernel specialisation the launchers use compiles for Hopper (sm_90) on this GPU-less machine, with
no register spills: `python -m awm_fast.kernels.build_check`, run in a subprocess without TRITON_INTERPRET (the
interpreter replaces the JIT functions the compiler needs)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("build") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "awm_fast.kernels.build_check", "--arch", "90", "--json", str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout


def test_every_kernel_and_option_compiles_for_sm90(sm90_report):
    report, stdout = sm90_report
    by_kernel: dict[str, list[dict]] = {}
    for r in report:
        by_kernel.setdefault(r["kernel"], []).append(r["constexprs"])
    assert set(by_kernel) == {"awm_partial_sums_kernel", "awm_finalise_kernel", "awm_grad_kernel", "sde_fwd_kernel",
                              "sde_log_prob_kernel", "sde_bwd_kernel"}
    assert {c["WEIGHTING"] for c in by_kernel["awm_finalise_kernel"]} == {0, 1, 2, 3, 4}
    assert {(c["ELBO"], c["HAS_OLD"]) for c in by_kernel["awm_finalise_kernel"]} >= {(False, False), (True, True)}
    assert {(c["HAS_REF"], c["HAS_EMA"]) for c in by_kernel["awm_grad_kernel"]} == {
        (True, True), (True, False), (False, False)}
    fwd = by_kernel["sde_fwd_kernel"]
    assert {c["KIND"] for c in fwd} == {0, 1, 2} and {c["NOISE"] for c in fwd} == {0, 1, 2}
    assert {c["LOG_PROB_MODE"] for c in fwd} == {True, False} and {c["HAS_UNCOND"] for c in fwd} == {True, False}
    assert {(c["NEED_X"], c["HAS_G_MEAN"]) for c in by_kernel["sde_bwd_kernel"]} == {(False, False), (True, True)}
    assert f"{len(report)} specialisations built for sm_90" in stdout


def test_no_specialisation_spills_registers(sm90_report):
    report, _ = sm90_report
    for r in report:
        assert r["arch"] == "sm_90" and 0 < r["registers"] <= 255, r
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
    velocities = [r for r in report if r["kernel"] == "awm_grad_kernel"]
    assert all(r["pointer_types"]["v_ptr"] == "*bf16" and r["pointer_types"]["u_ptr"] == "*fp32" for r in velocities)
