"""step_time.py --merge: runs split over several calls make one report with the same ratios and targets."""
import json

import pytest

from benchmarks import _merge, step_time


def _split(saved: dict, tmp_path):
    """Two runs from one: A has the kernels and the baseline phase rows, B the other phase rows (its ratios
    erased, as if its run had no baseline) and a not-run copy of one of A's rows."""
    a = {**saved, "phases": [r for r in saved["phases"] if r["variant"] == "baseline"]}
    b_rows = [{**r, "speedup_vs_baseline": None} for r in saved["phases"] if r["variant"] != "baseline"]
    b_rows.append({**a["phases"][0], "status": "not run: time budget spent (--budget-s 5)", "images_per_s": None})
    b = {**saved, "kernels": [], "phases": b_rows, "notes": ["from run b"]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, run in zip(paths, (a, b)):
        path.write_text(json.dumps(run))
    return paths


def test_merge_recovers_the_ratios_and_targets_of_the_whole_run(tiny_run, tmp_path):
    _, saved, _ = tiny_run
    paths = _split(saved, tmp_path)
    out = tmp_path / "merged"
    merged = step_time.main(["--merge", *map(str, paths), "--out", str(out)])
    key = lambda r: (r["model"], r["variant"], r["phase"])  # noqa: E731
    want = {key(r): r for r in saved["phases"]}
    assert {key(r) for r in merged["phases"]} == set(want)
    for r in merged["phases"]:
        assert r.get("images_per_s") == want[key(r)].get("images_per_s"), key(r)  # the measured row was kept
        assert r["speedup_vs_baseline"] == pytest.approx(want[key(r)]["speedup_vs_baseline"]), key(r)
    assert [t["value"] for t in merged["targets"]] == pytest.approx([t["value"] for t in saved["targets"]])
    assert len(merged["kernels"]) == len(saved["kernels"])
    assert merged["flops_by_model"] == saved["flops_by_model"] and merged["merged_from"] == list(map(str, paths))
    assert "from run b" in merged["notes"] and any("merged from 2 runs" in n for n in merged["notes"])
    for name in ("json", "csv", "md", "kernels_png", "phases_png"):
        assert name in merged["files"]
    assert (out / "step_time_cpu_tiny.md").read_text().startswith("# step_time: CPU run: NOT a GPU measurement")


def test_merge_refuses_runs_it_cannot_combine(tiny_run, tmp_path):
    _, saved, _ = tiny_run
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**saved, "system": {**saved["system"], "gpu_name": "NVIDIA H200"}}))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="different devices"):
        _merge.merge_runs([_merge.load_run(mine), _merge.load_run(other)])
    with pytest.raises(ValueError, match="different shape sets"):
        _merge.merge_runs([_merge.load_run(mine), {**_merge.load_run(mine), "size": "cpu"}])
    gpu = {**_merge.load_run(mine), "system": {**saved["system"], "gpu_name": "NVIDIA H200"}}
    both = _merge.merge_runs([{**gpu, "size": "quick"}, {**gpu, "size": "full"}])  # the same model shapes
    assert both["size"] == "full" and both["label"].endswith("(merged from 2 runs)")
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(SystemExit, match="junk.json"):
        step_time.main(["--merge", str(junk), "--out", str(tmp_path)])
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="not a step_time result"):
        _merge.load_run(tmp_path / "empty.json")
