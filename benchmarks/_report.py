"""Targets, the printed table, and the files of a run: JSON (everything), CSV (one row per measurement),
Markdown (the tables) and PNG plots (kernel time and GB/s against bytes moved; phase images/s per variant).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from benchmarks._models import model_spec

# (header, key) of the printed tables; every key is a field of the JSON rows (tests check this).
KERNEL_COLUMNS = [("op", "op"), ("mode", "mode"), ("rows", "rows"), ("latent", "latent"), ("variant", "variant"),
                  ("median ms", "median_ms"), ("p20 ms", "p20_ms"), ("p80 ms", "p80_ms"), ("MB moved", "bytes"),
                  ("GB/s", "gbps"), ("% copy", "pct_copy_bw"), ("x torch", "speedup_vs_torch"),
                  ("peak MB", "peak_mem_bytes"), ("status", "status")]
PHASE_COLUMNS = [("model", "model"), ("variant", "variant"), ("phase", "phase"), ("img/s", "images_per_s"),
                 ("img/s p20", "images_per_s_p20"), ("img/s p80", "images_per_s_p80"), ("median ms", "median_ms"),
                 ("x baseline", "speedup_vs_baseline"), ("TFLOP/img", "model_tflop_per_image"), ("MFU %", "mfu_pct"),
                 ("peak MB", "peak_mem_bytes"), ("reward ms", "reward_score_ms"), ("reward wait ms", "reward_wait_ms"),
                 ("SM MHz", "telemetry_sm_clock_mhz_mean"),
                 ("W", "telemetry_power_w_mean"), ("util %", "telemetry_gpu_util_pct_mean"), ("status", "status")]
TARGET_COLUMNS = [("target", "name"), ("threshold", "threshold"), ("measured", "value"), ("phase row", "judged_on"),
                  ("status", "status")]
EAGER_FAST = "fast -compile_blocks"  # judged in place of "fast" where a compiled fast row was not measured
PRINTED_KERNEL_MODES = {("awm_loss", "full"), ("sde_logprob", "full"), ("sde_sample", "forward")}
BIG_WORKING_SET = 64e6


def _pick(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("status") == "ok"]


def evaluate_targets(kernels: list[dict], phases: list[dict], is_gpu: bool) -> list[dict]:
    """Each target of benchmarks/README.md: met / not met / not measured (the value is shown either way)."""
    fused = [r for r in _pick(kernels, op="awm_loss", mode="full", variant="triton") if r["bytes"] >= BIG_WORKING_SET]
    fast = {r["phase"]: r for r in _pick(phases, variant=EAGER_FAST)}
    fast.update({r["phase"]: r for r in _pick(phases, variant="fast")})
    checks = [
        ("fused loss % of copy bandwidth (full, >= 64 MB, worst case)", 80.0,
         min((r["pct_copy_bw"] for r in fused if r.get("pct_copy_bw") is not None), default=None)),
        ("fused loss speedup vs float64 eager (full, >= 64 MB, worst case)", 10.0,
         min((r["speedup_vs_torch"] for r in fused if r.get("speedup_vs_torch") is not None), default=None)),
        ("training images/s vs unfused baseline", 3.0, fast.get("train", {}).get("speedup_vs_baseline")),
        ("training MFU %", 50.0, fast.get("train", {}).get("mfu_pct")),
        ("rollout images/s vs unfused baseline", 2.0, fast.get("rollout", {}).get("speedup_vs_baseline")),
        ("end-to-end images/s vs unfused baseline", 2.5, fast.get("end_to_end", {}).get("speedup_vs_baseline")),
    ]
    judged = {"training images/s vs unfused baseline": "train", "training MFU %": "train",
              "rollout images/s vs unfused baseline": "rollout", "end-to-end images/s vs unfused baseline": "end_to_end"}
    out = []
    for name, threshold, value in checks:
        row = fast.get(judged.get(name))
        on = None if row is None or value is None else row["variant"]
        if value is None:
            status = "not measured"
        elif not is_gpu:
            status = "not measured (CPU run, not a GPU measurement)"
        else:
            status = "met" if value >= threshold else "not met"
        out.append({"name": name, "threshold": threshold, "value": value, "status": status, "judged_on": on})
    return out


def run_targets(result: dict) -> list[dict]:
    """`evaluate_targets` of a run or merged result: its kernel rows and its SD3.5-M-shaped phase rows (the tiny
    MMDiT's on a CPU), judged as a GPU measurement only when the run names a GPU."""
    target_model = model_spec(result["size"], "sd35m").name
    phases = [r for r in result.get("phases", []) if r.get("model") == target_model]
    return evaluate_targets(result.get("kernels", []), phases, bool(result["system"].get("gpu_name")))


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("bytes", "peak_mem_bytes"):
        return f"{value / 1e6:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict], columns) -> str:
    """A Markdown table of `rows` with the given (header, key) columns."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def printed_kernel_rows(kernels: list[dict]) -> list[dict]:
    return [r for r in kernels if (r["op"], r["mode"]) in PRINTED_KERNEL_MODES]


def phase_models(result: dict) -> list[str]:
    """The phase models of a run, in the order they ran."""
    return list(dict.fromkeys(r.get("model") for r in result.get("phases", [])))


def optimisation_gains(rows: list[dict]) -> str:
    """A Markdown table: for each `fast -X` variant (rows) and phase (columns), fast images/s / its images/s;
    empty when the run has no measured fast row or no measured `fast -X` row."""
    ok = {(r["variant"], r["phase"]): r["images_per_s"] for r in rows if r.get("status") == "ok"}
    phases = [p for p in ("rollout", "rollout_cfg", "train", "end_to_end") if ("fast", p) in ok]
    toggles = list(dict.fromkeys(r["variant"] for r in rows if r["variant"].startswith("fast -")
                                 and any((r["variant"], p) in ok for p in phases)))
    if not phases or not toggles:
        return ""
    head = "| without | " + " | ".join(phases) + " |"
    rule = "|---|" + "|".join("---" for _ in phases) + "|"
    body = ["| " + v.removeprefix("fast -") + " | " + " | ".join(
        f"{ok[('fast', p)] / ok[(v, p)]:.3g}x" if (v, p) in ok else "-" for p in phases) + " |" for v in toggles]
    return "\n".join([head, rule, *body])


def render(result: dict) -> str:
    """The text printed last (and the body of the .md file)."""
    info, cal = result["system"], result["calibration"]
    lines = [f"# step_time: {result['label']}", "",
             f"device: {info.get('gpu_name') or info.get('cpu')} | torch {info['torch']} | triton {info.get('triton')} | "
             f"driver {info.get('driver_version', '-')} | CUDA {info.get('cuda_driver_version') or info.get('torch_cuda')}"
             f" | {info['nvml']}",
             f"copy bandwidth: {cal['copy']['gbps']:.1f} GB/s | matmul ({cal['matmul']['dtype']}, n={cal['matmul']['n']}):"
             f" {cal['matmul']['tflops']:.3f} TFLOP/s", ""]
    if result.get("kernels"):
        lines += ["## Kernels (full mode = forward + backward; all modes in the CSV/JSON)", "",
                  table(printed_kernel_rows(result["kernels"]), KERNEL_COLUMNS), ""]
    if result.get("phases"):
        flops = result.get("flops_by_model") or {result["phase_model"]: result["flops"]}
        for model in phase_models(result):
            fl = flops.get(model)
            about = (f"; forward {fl['forward_per_image'] / 1e12:.4g} TFLOP/image by formula, "
                     f"{fl['forward_counted'] / 1e12:.4g} counted" if fl else "")
            model_rows = [r for r in result["phases"] if r.get("model") == model]
            lines += [f"## Phases ({model}{about})", "", table(model_rows, PHASE_COLUMNS), ""]
            gains = optimisation_gains(model_rows)
            if gains:
                lines += [f"### Where the time goes ({model}): images/s of `fast` over `fast -X`, per phase "
                          "(how much slower the fast path is without X)", "", gains, ""]
    lines += ["## Targets", "", table(result["targets"], TARGET_COLUMNS), ""]
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def write_csv(path: Path, result: dict) -> None:
    """One CSV: a row per kernel or phase measurement, with `section` and the run's label on every row."""
    rows = [{"section": "kernel", **r} for r in result.get("kernels", [])]
    rows += [{"section": "phase", **r} for r in result.get("phases", [])]
    keys: list[str] = ["label", "device"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({"label": result["label"], "device": result["system"]["device"], **r})


def plot_kernels(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted(PRINTED_KERNEL_MODES)
    fig, axes = plt.subplots(2, len(ops), figsize=(5 * len(ops), 8), squeeze=False)
    copy_gbps = result["calibration"]["copy"]["gbps"]
    for j, (op, mode) in enumerate(ops):
        rows = _pick(result["kernels"], op=op, mode=mode)
        for variant in sorted({r["variant"] for r in rows}):
            pts = sorted((r["bytes"], r["median_ms"], r["gbps"]) for r in rows if r["variant"] == variant)
            axes[0][j].plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", label=variant)
            axes[1][j].plot([p[0] / 1e6 for p in pts], [p[2] for p in pts], "o-", label=variant)
        axes[1][j].axhline(copy_gbps, color="gray", ls="--", label="device copy")
        axes[0][j].set(title=f"{op} ({mode})", xscale="log", yscale="log", ylabel="median ms")
        axes[1][j].set(xscale="log", yscale="log", xlabel="MB moved (byte model)", ylabel="GB/s")
        axes[0][j].legend(fontsize=8)
        axes[1][j].legend(fontsize=8)
    fig.suptitle(f"Kernel time and bandwidth: {result['label']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_phases(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["phases"] if r.get("status") == "ok"]
    phases = [p for p in ("rollout", "rollout_cfg", "train", "end_to_end") if any(r["phase"] == p for r in rows)]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    models = list(dict.fromkeys(r.get("model") for r in rows))  # one row of panels per phase model
    height = len(models) * (0.5 * len(variants) + 2)
    fig, axes = plt.subplots(len(models), len(phases), figsize=(4.5 * len(phases), height), squeeze=False)
    for (model, phase), ax in zip([(m, p) for m in models for p in phases], axes.flat):
        vals = {r["variant"]: r for r in rows if r["phase"] == phase and r.get("model") == model}
        names = [v for v in variants if v in vals]
        if not names:
            ax.set_axis_off()
            ax.set_title(f"{model}: {phase} (not run)", fontsize=9)
            continue
        ax.barh(names, [vals[v]["images_per_s"] for v in names],
                color=["tab:green" if v == "fast" else "tab:red" if v == "baseline" else "tab:blue" for v in names])
        for i, v in enumerate(names):
            s = vals[v].get("speedup_vs_baseline")
            ax.text(vals[v]["images_per_s"], i, f" {s:.2f}x" if s else "", va="center", fontsize=8)
        ax.set_title(f"{model}: {phase}", fontsize=9)
        ax.set(xlabel="images/s")
        ax.invert_yaxis()
    fig.suptitle(f"Phases, fast vs baseline and fast minus one: {result['label']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    """path's new text, written to a temporary file, flushed to disk and renamed over it: a process killed at
    any moment leaves the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_row(path: Path, row: dict) -> None:
    """One measured row appended to a JSON-lines file, flushed to disk before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_outputs(result: dict, out_dir: Path, stem: str, final: bool = True) -> dict[str, str]:
    """stem.json and stem.md under out_dir, and when `final` also stem.csv, stem_kernels.png and stem_phases.png
    (a run's checkpoints after each variant write the first two only); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    saved = {k: v for k, v in result.items() if k != "files"}  # where this machine put the files: not a result
    write_atomic(paths["json"], json.dumps(saved, indent=1, default=str) + "\n")
    write_atomic(paths["md"], render(result) + "\n")
    if not final:
        return {k: str(v) for k, v in paths.items()}
    paths["csv"] = out_dir / f"{stem}.csv"
    write_csv(paths["csv"], result)
    if result.get("kernels") and any(r.get("status") == "ok" for r in result["kernels"]):
        paths["kernels_png"] = out_dir / f"{stem}_kernels.png"
        plot_kernels(paths["kernels_png"], result)
    if result.get("phases") and any(r.get("status") == "ok" for r in result["phases"]):
        paths["phases_png"] = out_dir / f"{stem}_phases.png"
        plot_phases(paths["phases_png"], result)
    return {k: str(v) for k, v in paths.items()}
