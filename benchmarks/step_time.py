"""Profiling harness: fused kernels and trainer phases of awm-fast against the unfused official-style baseline.

    python benchmarks/step_time.py                 # full run (GPU): official shapes + sweep, SD3.5-M- and
                                                   # FLUX.1-dev-shaped phases (FLUX where GPU memory allows)
    python benchmarks/step_time.py --quick         # short run; on a CPU: tiny shapes, labelled NOT a GPU measurement
    python benchmarks/step_time.py --quick --tiny  # the smallest CPU run (the CI test)
    python benchmarks/step_time.py --only kernels  # kernels | phases | kernels,phases (default)
    python benchmarks/step_time.py --model flux    # phase model: sd35m | flux | both (default; CPU: tiny shapes)
    python benchmarks/step_time.py --budget-s 420 --variants fast,baseline   # fit a lease: see benchmarks/README.md
    python benchmarks/step_time.py --merge a.json b.json   # one report of several runs on the same GPU

Every figure is measured in this one run on this one machine: the kernel timings (median, 20/80 % from CUDA
events via triton.testing.do_bench; wall clock on a CPU), the device-to-device copy bandwidth and the dense
matmul rate used as the roofline for GB/s and MFU, and the phase images/s of each variant. The byte model is in
benchmarks/_kernels.py, the FLOP formulas in benchmarks/_models.py, the phases in benchmarks/_phases.py (the
variants in benchmarks/_variants.py).
Writes <out>/<stem>.{json,csv,md} and <stem>_{kernels,phases}.png; prints the table last.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `awm_fast` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _flops, _kernels, _merge, _models, _phases, _report, _telemetry, _timing, _variants  # noqa: E402
from benchmarks._models import model_spec  # noqa: E402
from benchmarks._variants import TOGGLES  # noqa: E402
from awm_fast import env  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SECTIONS = ("kernels", "phases")
NOT_GPU = "CPU run: NOT a GPU measurement"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (fewer repetitions, no sweep past 1024 px x 144 rows)")
    ap.add_argument("--tiny", action="store_true", help="CPU only: the smallest shapes, no torch.compile (CI)")
    ap.add_argument("--only", default="kernels,phases", help="comma list of sections: kernels, phases")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/results/)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--model", default="both", choices=(*_models.MODELS, "both"),
                    help="phase model: SD3.5-M-shaped, FLUX.1-dev-shaped (skipped if GPU memory is short), or both; "
                         "on a CPU the tiny shapes of each")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (kernels and transformer blocks)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile even with --tiny (the dry run of device.sh: inductor on the CPU)")
    ap.add_argument("--variants", default=None,
                    help="phase variants, a comma list of fast, baseline, toggles (every 'fast -X'), -X for X in "
                         f"{', '.join(TOGGLES)} (default: all; fast and baseline always run first)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: no kernel case, phase variant or phase model starts after this many "
                         "seconds (one already running finishes); what was left out is reported as not run")
    ap.add_argument("--phases", default=None,
                    help=f"comma list of phases to run, among {', '.join(_phases.PHASES)}, or 'preset': those the "
                         "model's preset runs (no rollout_cfg without CFG) (default: all)")
    ap.add_argument("--min-mb", type=float, default=None,
                    help="kernels: only the shapes whose AWM-loss working set (full mode) is at least this many MB")
    ap.add_argument("--tag", default="", help="appended to the output file names (step_time_<gpu>[_quick]_<tag>)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="measure nothing: merge the JSON files of earlier runs on one device into one report")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        ap.error(f"--only {args.only!r}: sections must be among {', '.join(SECTIONS)}")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        ap.error(f"--tag {args.tag!r}: use letters, digits, '.', '_' and '-' only")
    args.sections = sections
    args.phase_list = _phases.PHASES if args.phases in (None, "preset") else tuple(
        p.strip() for p in args.phases.split(",") if p.strip())
    if not args.phase_list or any(p not in _phases.PHASES for p in args.phase_list):
        ap.error(f"--phases {args.phases!r}: phases must be among {', '.join(_phases.PHASES)}")
    try:
        _variants.variants(args.variants)
        _timing.Budget(args.budget_s)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def pick_device(name: str) -> torch.device:
    try:
        return env.pick_device(name, "--device")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def run_size(device: torch.device, quick: bool, tiny: bool) -> str:
    """Shape set: full / quick on CUDA; cpu / tiny on a CPU (a CPU run is always short)."""
    if device.type == "cuda":
        if tiny:
            raise SystemExit("--tiny is for CPU runs (it would measure nothing useful on a GPU)")
        return "quick" if quick else "full"
    return "tiny" if tiny else "cpu"


def output_stem(device: torch.device, info: dict, size: str, model: str = "both", tag: str = "") -> str:
    """step_time_<gpu>[_quick] / step_time_cpu_{quick,tiny}, with _<model> when one phase model was asked for and
    _<tag> when --tag names one."""
    suffix = ("" if model == "both" else f"_{model}") + (f"_{tag}" if tag else "")
    if device.type != "cuda":
        return f"step_time_cpu_{'tiny' if size == 'tiny' else 'quick'}{suffix}"
    gpu = re.sub(r"[^a-z0-9]+", "_", (info.get("gpu_name") or "gpu").lower()).strip("_")
    return f"step_time_{gpu}" + ("_quick" if size == "quick" else "") + suffix


def memory_skip_reason(spec: _models.ModelSpec, device: torch.device) -> str | None:
    """On a GPU, why a phase model will not fit in the free memory now (None: try it). Checked for FLUX only: the
    SD3.5-M phases need a fraction of any H100/H200."""
    if device.type != "cuda" or spec.kind != "flux":
        return None
    free, total = torch.cuda.mem_get_info(device)
    est = _models.phase_memory_estimate(spec)
    if free >= est["total_bytes"]:
        return None
    return (f"{spec.name} phase skipped: it needs ~{est['total_bytes'] / 1e9:.0f} GB of GPU memory (float32 weights "
            f"of {est['params'] / 1e9:.1f} B parameters {est['weights_fp32_bytes'] / 1e9:.0f} GB for the baseline and "
            f"every variant's build, ~{est['activation_bytes'] / 1e9:.0f} GB of training activations, 2 GiB "
            f"workspace); {free / 1e9:.0f} of {total / 1e9:.0f} GB are free on this GPU")


def run_phase_models(args, device: torch.device, size: str, quick: bool, with_compile: bool, cal: dict,
                     result: dict, notes: list[str], budget: _timing.Budget, save, record) -> None:
    """The phases of each asked-for model, one after the other (each Bench freed before the next is built). The
    first model's name, workload and FLOPs keep the single-model fields; `phase_models`, `phase_workloads` and
    `flops_by_model` list them all, and every phase row carries its `model`. As soon as a phase is measured,
    `record(row)` appends its row to the rows file and `save()` rewrites the JSON and Markdown (atomically), so a
    run stopped from outside, even by SIGKILL, still leaves every phase it finished."""
    names = list(_models.MODELS) if args.model == "both" else [args.model]
    rows: list[dict] = []  # every model's rows, appended as each phase finishes
    workloads: dict = {}
    flops: dict = {}
    skipped: dict = {}
    finished: set[str] = set()  # models with at least one measured phase
    result["phase_models_skipped"] = skipped

    def publish(model: str | None = None, row: dict | None = None) -> None:
        finished.update([model] if model and row and row.get("status") == "ok" else [])
        if row is not None:
            record(row)
        if not workloads:
            return
        first = next(iter(workloads))
        result.update(phase_model=first, phase_workload=workloads[first], flops=flops[first], phases=rows,
                      phase_models=list(workloads), phase_workloads=workloads, flops_by_model=flops)
        save()

    for name in names:
        spec = model_spec(size, name)
        reason = memory_skip_reason(spec, device) or (
            f"{spec.name} phase {budget.skip()}" if budget.spent() else None)
        if reason:
            print(f"[step_time] {reason}")
            skipped[spec.name] = reason
            notes.append(reason)
            continue
        first_row = len(rows)
        try:
            bench = _phases.Bench(spec, device)
            workloads[spec.name] = workload_fields(spec)
            flops[spec.name] = _flops.model_flops(spec, args.out)
            phases = spec.preset_phases(args.phase_list) if args.phases == "preset" else args.phase_list
            _phases.run_phases(bench, phases, quick, with_compile, cal["matmul"]["tflops"] * 1e12,
                               flops[spec.name], log=lambda msg: print(msg, file=sys.stderr), only=args.variants,
                               budget=budget, rows=rows, on_row=lambda row: publish(spec.name, row))
        except Exception as exc:  # the FLUX phase is an extra: its failure keeps the SD3.5-M results
            if spec.kind != "flux":
                raise
            traceback.print_exc()
            failed = f"{spec.name} phase failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            kept = spec.name in finished  # keep what was measured; the failure is in the notes
            notes.append(failed + (" (the variants measured before it are kept)" if kept else ""))
            if not kept:
                del rows[first_row:]
                skipped[spec.name] = failed
                workloads.pop(spec.name, None)
                flops.pop(spec.name, None)
            publish()
            bench = None
            _phases.release_memory(device)
            continue
        publish()
        del bench
        _phases.release_memory(device)
        _phases.diffusers_default_attention()  # set_flux_attention changes a process-wide default


def workload_fields(spec: _models.ModelSpec) -> dict:
    return {k: getattr(spec, k) for k in ("latent", "text_len", "rollout_batch", "micro_batch", "num_timesteps",
                                          "num_steps", "guidance_scale", "lora_rank", "kind", "guidance",
                                          "gradient_checkpointing")}


def compile_available(device: torch.device, requested: bool) -> tuple[bool, str | None]:
    """torch.compile needs a C++ compiler on a CPU (inductor); Triton on CUDA."""
    if not requested:
        return False, "torch.compile skipped (--no-compile or --tiny)"
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return False, "torch.compile skipped: no C++ compiler for inductor on this CPU"
    return True, None


def calibrate(device: torch.device, size: str, quick: bool) -> dict:
    """Device copy bandwidth and dense matmul rate (bf16 on CUDA, float32 on a CPU), measured now."""
    copy_bytes = {"full": 2**30, "quick": 2**29, "cpu": 2**26, "tiny": 2**23}[size]
    mm_n = {"full": 8192, "quick": 8192, "cpu": 512, "tiny": 256}[size]
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"copy": _timing.copy_bandwidth(device, copy_bytes, quick=quick),
            "matmul": _timing.matmul_rate(device, mm_dtype, mm_n, quick=quick)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge_main(args)
    device = pick_device(args.device)
    size = run_size(device, args.quick, args.tiny)
    threads = torch.get_num_threads()
    if size == "tiny":  # tiny shapes gain nothing from intra-op threads; on a loaded CPU they stall in OpenMP
        torch.set_num_threads(1)
    try:
        return run(args, device, size)
    finally:
        torch.set_num_threads(threads)


def phase_notes(model: str) -> list[str]:
    """What the phase rows mean (the notes of a run with a phase section)."""
    return ["CUDA graphs (GPU only): the no-grad transformer calls of the fast path replay CUDA graphs (the LoRA "
            "routing is a tensor input); `fast -cuda_graphs` measures without them.",
            f"phase models (--model {model}): SD3.5-M-shaped and/or FLUX.1-dev-shaped (FLUX: 512 T5 tokens, "
            "guidance embedding 3.5, no CFG, activation checkpointing in every variant, as the FLUX presets); "
            "the targets are judged on the SD3.5-M-shaped rows.",
            "training phase = one micro-batch (micro_batch images x T timesteps, 3 velocities + backward); the "
            "AdamW step (once per epoch of 1728 images in the official presets) is excluded.",
            "end_to_end = rollout (no CFG) + VAE decode + JPEG reward + advantages + training of every "
            "micro-batch of the rollout batch."]


def run(args: argparse.Namespace, device: torch.device, size: str) -> dict:
    quick = args.quick or device.type != "cuda"
    budget = _timing.Budget(args.budget_s)
    info = _telemetry.system_info(device)
    print(f"[step_time] {info['nvml']}")
    is_gpu = device.type == "cuda"
    label = (f"GPU {info.get('gpu_name')}" if is_gpu else NOT_GPU) + f" ({size} shapes)"
    with_compile, compile_note = compile_available(device, not args.no_compile and (args.compile or not args.tiny))
    notes = [] if is_gpu else [f"{NOT_GPU}: tiny shapes and CPU backends; the GPU figures remain to be measured "
                               f"(benchmarks/README.md)."]
    notes += [compile_note] if compile_note else []
    notes += ["--tiny: one torch intra-op thread (tiny shapes)."] if size == "tiny" else []
    notes += [f"--variants {args.variants}: only these phase variants ran."] if args.variants else []
    notes += [f"--phases {args.phases}: only these phases ran."] if args.phases else []
    notes += [f"--min-mb {args.min_mb:g}: only kernel shapes whose loss working set is >= {args.min_mb:g} MB."] \
        if args.min_mb is not None else []
    notes += phase_notes(args.model) if "phases" in args.sections else []
    if not is_gpu and "TRITON_INTERPRET" not in __import__("os").environ:
        notes.append("Triton kernels not run: on a CPU they need TRITON_INTERPRET=1 (then only at tiny sizes).")
    cal = calibrate(device, size, quick)
    result: dict = {"label": label, "size": size, "quick": quick, "system": info, "calibration": cal,
                    "argv": args.argv, "notes": notes, "budget_s": args.budget_s}
    stem = output_stem(device, info, size, args.model, args.tag)

    def save(final: bool = False) -> None:
        """Targets and wall time as of now, and the files (JSON and Markdown; CSV and plots only at the end)."""
        result["targets"] = _report.run_targets(result)
        result["wall_s"] = budget.elapsed()
        result["files"] = _report.write_outputs(result, args.out, stem, final=final)

    if "kernels" in args.sections:
        with _telemetry.Telemetry(device) as tel:
            result["kernels"] = _kernels.run_kernels(device, size, quick, with_compile, cal["copy"]["gbps"], budget,
                                                     min_bytes=None if args.min_mb is None else args.min_mb * 1e6)
        result["kernels_telemetry"] = tel.summary()
        save()
    if "phases" in args.sections:
        rows_path = args.out / f"{stem}_rows.jsonl"  # every phase row, appended and flushed as it is measured
        args.out.mkdir(parents=True, exist_ok=True)
        rows_path.unlink(missing_ok=True)
        run_phase_models(args, device, size, quick, with_compile, cal, result, notes, budget, save,
                         lambda row: _report.append_row(rows_path, row))
    if budget.skipped:
        notes.append(f"--budget-s {args.budget_s:g}: {budget.skipped} unit(s) of work started too late and are "
                     "reported as not run; run them with --only/--model/--variants and combine with --merge.")
    save(final=True)
    print(_report.render(result))
    print("\nwrote: " + ", ".join(result["files"].values()))
    return result


def merge_main(args: argparse.Namespace) -> dict:
    """--merge: one report (JSON, CSV, Markdown, plots) of several runs' JSON files, written under --out."""
    try:
        result = _merge.merge_runs([_merge.load_run(p) for p in args.merge])
    except ValueError as exc:
        raise SystemExit(f"--merge: {exc}") from None
    device = torch.device("cuda" if result["system"].get("gpu_name") else "cpu")
    stem = output_stem(device, result["system"], result["size"], args.model, args.tag)
    result["files"] = _report.write_outputs(result, args.out, stem)
    print(_report.render(result))
    print("\nwrote: " + ", ".join(result["files"].values()))
    return result


if __name__ == "__main__":
    main()
