"""`step_time.py --merge`: one report of several runs on the same device (a GPU lease too short for one full run
is split with --only / --model / --variants, then the JSON files are merged).

Rows are keyed by what they measure (kernels: op, mode, rows, latent, variant; phases: model, variant, phase); a
later run's row replaces an earlier one, except that a row that was not measured never replaces one that was. The
ratios (speedup over float64 eager, over the baseline) and the targets are recomputed over the merged rows, so a
ratio may now relate rows of two runs: the merged report says so in its notes.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import _kernels, _phases, _report

KERNEL_KEY = ("op", "mode", "rows", "latent", "variant")
PHASE_KEY = ("model", "variant", "phase")
GPU_SIZES = {"full", "quick"}  # the same real model shapes; quick only has fewer kernel shapes and repetitions


def load_run(path: Path) -> dict:
    """A step_time JSON file, checked for the fields a merge needs."""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable step_time JSON file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("label", "size", "system", "calibration") if k not in run]
    if missing:
        raise ValueError(f"{path}: not a step_time result (no {', '.join(missing)})")
    run["_path"] = str(path)
    return run


def _measured(row: dict) -> bool:
    return row.get("status") == "ok"


def merge_rows(runs: list[list[dict]], key: tuple[str, ...]) -> list[dict]:
    """Rows of every run in first-seen order; a later row with the same key replaces an earlier one unless the
    earlier was measured and the later was not."""
    merged: dict[tuple, dict] = {}
    for rows in runs:
        for row in rows:
            k = tuple(row.get(f) for f in key)
            if k in merged and _measured(merged[k]) and not _measured(row):
                continue
            merged[k] = dict(row)
    return list(merged.values())


def merge_runs(runs: list[dict]) -> dict:
    """One result dict (the shape `step_time.run` returns) of runs on one device, in the order given."""
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    devices = {r["system"].get("gpu_name") or r["system"].get("cpu") for r in runs}
    if len(devices) > 1:
        raise ValueError(f"runs from different devices cannot be merged: {sorted(map(str, devices))}")
    sizes = {r["size"] for r in runs}
    if len(sizes) > 1 and not sizes <= GPU_SIZES:
        raise ValueError(f"runs of different shape sets cannot be merged: {sorted(sizes)}")
    size = "full" if "full" in sizes else first["size"]
    kernels = _kernels.with_speedups(merge_rows([r.get("kernels", []) for r in runs], KERNEL_KEY))
    phases = _phases.with_speedups(merge_rows([r.get("phases", []) for r in runs], PHASE_KEY))
    flops, workloads, skipped = {}, {}, {}
    for r in runs:
        flops.update(r.get("flops_by_model") or ({r["phase_model"]: r["flops"]} if r.get("phase_model") else {}))
        workloads.update(r.get("phase_workloads") or ({r["phase_model"]: r["phase_workload"]}
                                                      if r.get("phase_model") else {}))
        skipped.update(r.get("phase_models_skipped") or {})
    measured_models = list(dict.fromkeys(row["model"] for row in phases if _measured(row)))
    skipped = {m: why for m, why in skipped.items() if m not in measured_models}
    notes = list(dict.fromkeys(n for r in runs for n in r.get("notes", [])))
    notes.append(f"merged from {len(runs)} runs ({', '.join(r['_path'] for r in runs)}): a ratio may relate rows of "
                 "two runs on this device; each run's own copy bandwidth and matmul rate are under `calibrations`, "
                 "the first run's is the roofline of the report.")
    result = {"label": f"{first['label']} (merged from {len(runs)} runs)", "size": size,
              "quick": first.get("quick"), "system": first["system"], "calibration": first["calibration"],
              "calibrations": [r["calibration"] for r in runs], "argv": [r.get("argv") for r in runs],
              "merged_from": [r["_path"] for r in runs], "notes": notes, "kernels": kernels,
              "wall_s": sum(r.get("wall_s") or 0.0 for r in runs), "phase_models_skipped": skipped}
    if phases:
        model0 = next(iter(workloads), None) or measured_models[0]
        result.update(phases=phases, phase_model=model0, phase_workload=workloads.get(model0),
                      flops=flops.get(model0), phase_models=list(workloads), phase_workloads=workloads,
                      flops_by_model=flops)
    result["targets"] = _report.run_targets(result)
    return result
