"""Profiling harness: fused kernels and trainer phases of awm-fast against the unfused official-style baseline.

    python benchmarks/step_time.py                 # full run (GPU): official shapes + sweep, SD3.5-M-shaped phases
    python benchmarks/step_time.py --quick         # short run; on a CPU: tiny shapes, labelled NOT a GPU measurement
    python benchmarks/step_time.py --quick --tiny  # the smallest CPU run (the CI test)
    python benchmarks/step_time.py --only kernels  # kernels | phases | kernels,phases (default)

Every figure is measured in this one run on this one machine: the kernel timings (median, 20/80 % from CUDA
events via triton.testing.do_bench; wall clock on a CPU), the device-to-device copy bandwidth and the dense
matmul rate used as the roofline for GB/s and MFU, and the phase images/s of each variant. The byte model is in
benchmarks/_kernels.py, the FLOP formula in benchmarks/_models.py, the variants in benchmarks/_phases.py.
Writes <out>/<stem>.{json,csv,md} and <stem>_{kernels,phases}.png; prints the table last.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `awm_fast` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _kernels, _phases, _report, _telemetry, _timing  # noqa: E402
from benchmarks._models import model_spec  # noqa: E402
from awm_fast.models import load  # noqa: E402

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
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (kernels and transformer blocks)")
    args = ap.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        ap.error(f"--only {args.only!r}: sections must be among {', '.join(SECTIONS)}")
    args.sections = sections
    return args


def pick_device(name: str) -> torch.device:
    try:
        return load.pick_device(name, "--device")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def run_size(device: torch.device, quick: bool, tiny: bool) -> str:
    """Shape set: full / quick on CUDA; cpu / tiny on a CPU (a CPU run is always short)."""
    if device.type == "cuda":
        if tiny:
            raise SystemExit("--tiny is for CPU runs (it would measure nothing useful on a GPU)")
        return "quick" if quick else "full"
    return "tiny" if tiny else "cpu"


def output_stem(device: torch.device, info: dict, size: str) -> str:
    if device.type != "cuda":
        return f"step_time_cpu_{'tiny' if size == 'tiny' else 'quick'}"
    gpu = re.sub(r"[^a-z0-9]+", "_", (info.get("gpu_name") or "gpu").lower()).strip("_")
    return f"step_time_{gpu}" + ("_quick" if size == "quick" else "")


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
    device = pick_device(args.device)
    size = run_size(device, args.quick, args.tiny)
    quick = args.quick or device.type != "cuda"
    info = _telemetry.system_info(device)
    print(f"[step_time] {info['nvml']}")
    is_gpu = device.type == "cuda"
    label = (f"GPU {info.get('gpu_name')}" if is_gpu else NOT_GPU) + f" ({size} shapes)"
    with_compile, compile_note = compile_available(device, not (args.no_compile or args.tiny))
    notes = [] if is_gpu else [f"{NOT_GPU}: tiny shapes and CPU backends; the GPU figures remain to be measured "
                               f"(benchmarks/README.md)."]
    notes += [compile_note] if compile_note else []
    notes += ["CUDA graphs: not used (LoRA adapter routing changes per call; optional item).",
              "FLUX.1-dev-shaped phase: not run (optional; this version measures the SD3.5-M shape only).",
              "training phase = one micro-batch (micro_batch images x T timesteps, 3 velocities + backward); the "
              "AdamW step (once per epoch of 1728 images in the official presets) is excluded.",
              "end_to_end = rollout (no CFG) + VAE decode + JPEG reward + advantages + training of every "
              "micro-batch of the rollout batch."]
    if not is_gpu and "TRITON_INTERPRET" not in __import__("os").environ:
        notes.append("Triton kernels not run: on a CPU they need TRITON_INTERPRET=1 (then only at tiny sizes).")
    started = time.time()
    cal = calibrate(device, size, quick)
    result: dict = {"label": label, "size": size, "quick": quick, "system": info, "calibration": cal,
                    "argv": sys.argv[1:] if argv is None else list(argv), "notes": notes}
    if "kernels" in args.sections:
        with _telemetry.Telemetry(device) as tel:
            result["kernels"] = _kernels.run_kernels(device, size, quick, with_compile, cal["copy"]["gbps"])
        result["kernels_telemetry"] = tel.summary()
    if "phases" in args.sections:
        spec = model_spec(size)
        bench = _phases.Bench(spec, device)
        result["phase_model"] = spec.name
        result["phase_workload"] = {k: getattr(spec, k) for k in ("latent", "text_len", "rollout_batch", "micro_batch",
                                                                   "num_timesteps", "num_steps", "guidance_scale",
                                                                   "lora_rank")}
        result["phases"], result["flops"] = _phases.run_phases(
            bench, _phases.PHASES, quick, with_compile, cal["matmul"]["tflops"] * 1e12,
            log=lambda msg: print(msg, file=sys.stderr))
        del bench
    result["targets"] = _report.evaluate_targets(result.get("kernels", []), result.get("phases", []), is_gpu)
    result["wall_s"] = time.time() - started
    result["files"] = _report.write_outputs(result, args.out, output_stem(device, info, size))
    print(_report.render(result))
    print("\nwrote: " + ", ".join(result["files"].values()))
    return result


if __name__ == "__main__":
    main()
