"""The harness under a time budget (--budget-s), a variant subset (--variants), files written as it goes, and the
"where the time goes" table."""
import json

import pytest
import torch

from benchmarks import _kernels, _phases, _report, _timing, _variants
from benchmarks import step_time


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_runs_out_on_its_clock_and_counts_what_it_left_out():
    clock = FakeClock()
    budget = _timing.Budget(30.0, clock=clock)
    assert not budget.spent() and budget.elapsed() == 0.0
    clock.now += 29.5
    assert not budget.spent()
    clock.now += 0.5
    assert budget.spent()
    assert budget.skip() == "not run: time budget spent (--budget-s 30)" and budget.skipped == 1
    assert not _timing.Budget(None, clock=clock).spent()
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            _timing.Budget(bad)


def test_variant_selection_keeps_fast_and_baseline_first():
    every = [v.name for v in _variants.variants()]
    assert every[:2] == ["fast", "baseline"] and len(every) == 2 + len(_variants.TOGGLES) + len(_variants.EXTRAS)
    assert every[-2:] == ["fast +fp8", "fast +merged_lora"]  # issue 27's rows, after the toggles
    assert [v.name for v in _variants.variants("baseline,-bf16,fast")] == ["fast", "baseline", "fast -bf16"]
    assert [v.name for v in _variants.variants("toggles")] == [f"fast -{t}" for t in _variants.TOGGLES]
    assert [v.name for v in _variants.variants("fast -cuda_graphs")] == ["fast -cuda_graphs"]
    off = _variants.variants("-shared_batch")[0]
    assert not off.shared_batch and off.bf16 and off.compile_blocks
    for bad in ("fastest", "-flash", " , "):
        with pytest.raises(ValueError, match="--variants"):
            _variants.variants(bad)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--variants", "fast,slow"])
    with pytest.raises(SystemExit):
        step_time.parse_args(["--budget-s", "0"])
    with pytest.raises(SystemExit):
        step_time.parse_args(["--tag", "a/b"])


def test_a_spent_budget_leaves_every_kernel_case_reported_as_not_run():
    clock = FakeClock()
    budget = _timing.Budget(1.0, clock=clock)
    clock.now += 2.0
    rows = _kernels.run_kernels(torch.device("cpu"), "tiny", True, False, 10.0, budget)
    cases = _kernels.kernel_cases(torch.device("cpu"), "tiny", torch.float32)
    assert len(rows) == len(cases) * len(_kernels.available_variants(torch.device("cpu"), False))
    assert all(r["status"].startswith("not run: time budget") and "median_ms" not in r for r in rows)
    assert budget.skipped == len(cases)
    assert all(r["bytes"] > 0 for r in rows)  # still names what it would have measured


def test_a_run_past_its_budget_still_writes_its_files(tmp_path):
    result = step_time.main(["--quick", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "1e-6",
                             "--tag", "cut"])
    saved = json.loads((tmp_path / "step_time_cpu_tiny_cut.json").read_text())
    assert saved["budget_s"] == 1e-6 and saved["calibration"]["copy"]["gbps"] > 0
    assert saved["kernels"] and all(r["status"].startswith("not run") for r in saved["kernels"])
    assert set(saved["phase_models_skipped"]) == {"tiny-mmdit-cpu", "tiny-flux-cpu"}
    assert "phases" not in saved
    assert any("--budget-s 1e-06" in n and "--merge" in n for n in saved["notes"])
    assert result["files"]["md"].endswith("step_time_cpu_tiny_cut.md")


def test_files_are_written_after_each_variant(tmp_path, monkeypatch):
    """A run stopped from outside after the first variant leaves that variant's rows on disk."""
    real = _phases.run_variant
    calls = []

    def run_then_stop(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # as a kill in the middle of the second variant
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(_phases, "run_variant", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        step_time.main(["--quick", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--only", "phases",
                        "--model", "sd35m", "--variants", "fast,baseline"])
    saved = json.loads((tmp_path / "step_time_cpu_tiny_sd35m.json").read_text())
    assert calls == ["fast"]
    assert {r["variant"] for r in saved["phases"]} == {"fast"}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in saved["phases"])
    assert saved["flops"]["forward_per_image"] > 0 and saved["targets"]
    assert (tmp_path / "step_time_cpu_tiny_sd35m.md").read_text().count("| fast |") >= 3


def test_where_the_time_goes_table():
    rows = [{"variant": "fast", "phase": "train", "status": "ok", "images_per_s": 6.0},
            {"variant": "fast", "phase": "rollout", "status": "ok", "images_per_s": 9.0},
            {"variant": "fast -bf16", "phase": "train", "status": "ok", "images_per_s": 2.0},
            {"variant": "fast -bf16", "phase": "rollout", "status": "oom"},
            {"variant": "fast -compile_blocks", "phase": "*", "status": "skipped: no compiler"},
            {"variant": "baseline", "phase": "train", "status": "ok", "images_per_s": 1.0}]
    got = _report.optimisation_gains(rows).splitlines()
    assert got[0] == "| without | rollout | train |"
    assert got[2] == "| bf16 | - | 3x |"
    assert len(got) == 3  # compile_blocks measured nothing: no line
    assert _report.optimisation_gains([r for r in rows if r["variant"] != "fast"]) == ""


def test_the_tiny_run_prints_where_the_time_goes(tiny_run):
    _, _, out = tiny_run
    md = (out / "step_time_cpu_tiny.md").read_text()
    assert "### Where the time goes (tiny-mmdit-cpu)" in md and "| shared_batch |" in md


def test_a_flux_failure_keeps_the_variants_measured_before_it(tmp_path, monkeypatch):
    real = _phases.run_variant
    flux_calls = []

    def fail_second_flux_variant(bench, variant, *args, **kwargs):
        if bench.spec.kind == "flux":
            flux_calls.append(variant.name)
            if len(flux_calls) > 1:
                raise RuntimeError("simulated failure")
        return real(bench, variant, *args, **kwargs)

    monkeypatch.setattr(_phases, "run_variant", fail_second_flux_variant)
    result = step_time.main(["--quick", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--only", "phases",
                             "--variants", "fast,baseline"])
    flux = [r for r in result["phases"] if r["model"] == "tiny-flux-cpu" and r["status"] == "ok"]
    assert flux_calls == ["fast", "baseline"] and {r["variant"] for r in flux} == {"fast"}
    assert result["phase_models"] == ["tiny-mmdit-cpu", "tiny-flux-cpu"] and result["phase_models_skipped"] == {}
    assert any("tiny-flux-cpu phase failed: RuntimeError: simulated failure" in n and "kept" in n
               for n in result["notes"])
    saved = json.loads((tmp_path / "step_time_cpu_tiny.json").read_text())
    assert len(saved["phases"]) == len(result["phases"])


def test_a_new_variant_row_is_one_entry(monkeypatch):
    """An extra row (issue 27's FP8 / merged-LoRA rows) is a Variant appended to EXTRAS: listed after the toggles,
    selectable by name or by its "+X" part."""
    extra = _variants.replace(_variants.FAST, name="fast +planted", shared_batch=False)
    monkeypatch.setattr(_variants, "EXTRAS", [extra])
    assert _variants.variants()[-1] is extra
    assert [v.name for v in _variants.variants("fast,+planted")] == ["fast", "fast +planted"]
    assert _variants.variants("fast +planted") == [extra]
    with pytest.raises(ValueError, match=r"fast \+planted"):
        _variants.variants("+other")
