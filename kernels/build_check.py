"""Ahead-of-time build of the Triton kernels for a GPU this machine may not have.

    python -m awm_fast.kernels.build_check [--arch 90] [--json PATH]

The launchers of `awm_loss` and `sde_step` run on CPU tensors of the GPU dtypes (bf16 velocities, fp32
latents, SD3.5-M's 16x64x64 rows) with `torch.library.wrap_triton` replaced by a recorder, so no kernel
executes: each launch becomes a Triton signature (pointer dtypes, i32/i64, fp32, the constexpr values; 16-byte
divisibility where the JIT would find it) and is compiled by `triton.compile` for GPUTarget("cuda", arch, 32)
with the ptxas of Triton's wheel. Printed per specialisation: registers per thread, register spills and stack
frame (`ptxas -v`), shared memory. A compile error fails the run (exit 1) before any
GPU time is spent on it. Runs without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions the
compiler needs); the tests call it in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32"}
LATENT = (16, 64, 64)  # SD3.5 at 512 px


@contextlib.contextmanager
def recorded_launches():
    """Yields a list that fills with (kernel, args, kwargs) for every `wrap_triton(kernel)[grid](...)`; nothing runs."""
    launches: list[tuple] = []
    real = torch.library.wrap_triton

    class Recorder:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    torch.library.wrap_triton = Recorder
    try:
        yield launches
    finally:
        torch.library.wrap_triton = real


def launcher_calls(rows: int = 18) -> list[tuple]:
    """Every constexpr combination the ops take on a GPU path: the loss with each weighting, with and without the
    KL terms / old log-prob / ELBO / sum_first; the step in each kind, noise source, CFG and log-prob mode, and its
    backward with each gradient combination. Returns the recorded launches."""
    from awm_fast.kernels.awm_loss import WEIGHTING_IDS, launch_awm_loss
    from awm_fast.kernels.sde_step import launch_sde_backward, launch_sde_forward

    def rnd(dtype):
        return torch.randn(rows, *LATENT).to(dtype)

    v, u, ref, ema = rnd(torch.bfloat16), rnd(torch.float32), rnd(torch.bfloat16), rnd(torch.bfloat16)
    t, adv, old = torch.rand(rows), torch.rand(rows) * 2 - 1, torch.randn(rows)
    x, xn, noise = rnd(torch.float32), rnd(torch.float32), rnd(torch.float32)
    sig, sig_n = torch.full((rows,), 0.6), torch.full((rows,), 0.55)
    with recorded_launches() as launches:
        for weighting in WEIGHTING_IDS:
            launch_awm_loss(v, u, t, adv, ref, ema, None, 1e-3, 1.0, weighting, 0.25, 1.0, "uniform", "exp_first", 6)
        launch_awm_loss(v, u, t, adv, None, None, old, 0.0, 0.0, "ghuber", 0.25, 0.2, "elbo", "sum_first", 6)
        launch_awm_loss(v, u, t, adv, ref, None, old, 1e-3, 0.0, "t", 0.25, 1.0, "elbo", "exp_first", 1)
        for kind in ("euler_maruyama", "cps", "ode"):
            out = torch.empty_like(x)
            launch_sde_forward(x, v, sig, sig_n, None, None, None, out, 0.7, kind, 1.0, 1234, 0)  # in-kernel noise
            launch_sde_forward(x, v, sig, sig_n, noise, v, None, out, 0.7, kind, 4.5, 0, 0)  # noise tensor, CFG
            launch_sde_forward(x, v, sig, sig_n, None, None, xn, None, 0.7, kind, 1.0, 0, 0)  # log-prob mode
            launch_sde_backward(x, v, None, xn, sig, sig_n, torch.randn(rows), None, 0.7, kind, 1.0, False, False)
            launch_sde_backward(x, v, v, xn, sig, sig_n, torch.randn(rows), rnd(torch.float32), 0.7, kind, 4.5,
                                True, True)
    return launches


def signature_of(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of one launch, as the Triton JIT would specialise it."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | kwargs
    if set(values) != set(names):
        raise ValueError(f"{kernel.__name__}: launch gives {sorted(values)}, kernel takes {names}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, kernel.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            if value.dtype not in TYPES:
                raise TypeError(f"{kernel.__name__}.{name}: no Triton type for {value.dtype}")
            signature[name] = "*" + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{name}: no Triton type for {type(value).__name__} {value!r}")
    return signature, constexprs, attrs


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill stores / loads and stack frame (bytes) of the one kernel in `ptx`, from `ptxas -v` of
    Triton's wheel (the first of its ptxas builds that accepts this PTX version)."""
    from triton.backends.nvidia import compiler as nv

    bin_dir = Path(nv.__file__).parent / "bin"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for tool in ("ptxas-blackwell", "ptxas"):
            if not (bin_dir / tool).exists():
                continue
            proc = subprocess.run([str(bin_dir / tool), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                                   str(src), "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
            if proc.returncode == 0:
                log = proc.stderr + proc.stdout
                frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
                regs = re.search(r"Used (\d+) registers", log)
                if not frame or not regs:
                    raise RuntimeError(f"{tool} -v printed no resource usage:\n{log}")
                return {"registers": int(regs[1]), "stack_frame_bytes": int(frame[1]),
                        "spill_store_bytes": int(frame[2]), "spill_load_bytes": int(frame[3]), "ptxas": tool}
            errors.append(f"{tool}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("no ptxas of Triton's wheel assembled the kernel: " + " | ".join(errors))


def build_all(arch: int = 90) -> list[dict]:
    """Compile every distinct recorded specialisation for sm_<arch>; one dict per specialisation."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("build_check needs the Triton compiler: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen, report = set(), []
    for kernel, args, kwargs in launcher_calls():
        signature, constexprs, attrs = signature_of(kernel, args, kwargs)
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), str(sorted(attrs)))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target)
        report.append({"kernel": kernel.__name__, "arch": f"sm_{arch}",
                       "constexprs": {k: v for k, v in constexprs.items()},
                       "pointer_types": {k: v for k, v in signature.items() if v.startswith("*")},
                       "num_warps": compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared,
                       **ptxas_usage(compiled.asm["ptx"], arch)})
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100/H200)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    try:
        report = build_all(args.arch)
    except Exception as exc:  # a compile error is the finding: say which, exit 1
        print(f"build_check: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{'kernel':<24} {'regs':>4} {'spill B':>7} {'stack B':>7} {'shared B':>8}  constexprs")
    for r in report:
        spills = r["spill_store_bytes"] + r["spill_load_bytes"]
        print(f"{r['kernel']:<24} {r['registers']:>4} {spills:>7} {r['stack_frame_bytes']:>7} {r['shared_bytes']:>8}"
              f"  {r['constexprs']}")
    print(f"{len(report)} specialisations built for sm_{args.arch}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
