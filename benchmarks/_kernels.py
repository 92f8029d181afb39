"""Kernel benchmarks: the AWM loss and the SDE step, every available backend, modes forward/backward/full.

Variants (the baselines are the project's own reference code, `awm_fast.ops.*_torch`, which the tests also
use as ground truth, so reference code exists once):
- "torch": the float64 eager path (`backend="torch"`), what the official AWM code does;
- "torch_compile": the same torch function under `torch.compile`;
- every other backend of `awm_fast.ops.BACKENDS` that can run here ("triton": the fused kernels; on a CPU
  only with TRITON_INTERPRET=1 and only at tiny sizes; "cpp" / "cuda": the native ops of csrc/ when the
  extension is built, "cpp" on a CPU and "cuda" on a GPU).

Byte model (the bytes each op MUST move, independent of the implementation, so GB/s is an effective
bandwidth comparable across variants; R rows, D latent values per row, s(x) the element size of x; per-row
scalars are 4 bytes each):
- awm_loss forward:  read v, target, v_ref, v_ema; write dLoss/dv (fused: written during the forward)
                     = R D (s(v) + s(target) + s(v_ref) + s(v_ema) + s(v)) + R 4 (2 in + 4 out per-row values)
- awm_loss backward: read dLoss/dv, write grad v = 2 R D s(v)
- sde_step sample:   read x, v; write x_next and mean (the op's outputs) = R D (2 s(x) + s(v) + s(x))
                     + R 4 (sigma, sigma_next, log_prob); noise is drawn, never read (in-kernel Philox)
- sde_step log-prob forward:  read x, v, x_next; write mean = R D (3 s(x) + s(v)) + R 12
- sde_step log-prob backward (grad to v only): read x, v, x_next; write grad v = R D (2 s(x) + 2 s(v)) + R 4
- "full" = forward + backward.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from awm_fast.ops import BACKENDS, awm_loss, sde_step
from awm_fast.ops.dispatch import backend_present
from awm_fast.ops.awm_loss_torch import awm_loss_torch
from awm_fast.ops.sde_step_torch import sde_step_torch

from benchmarks._timing import Budget, bench_kernel, peak_memory_bytes

LOSS_OPTIONS = dict(beta=1e-3, ema_beta=1.0, weighting="ghuber", ghuber_power=0.25, clip_range=1.0,
                    kl_weighting="uniform", ratio_mode="exp_first")
SIGMA, SIGMA_NEXT, NOISE_LEVEL = 0.6, 0.55, 0.7
INTERPRET_MAX_ELEMENTS = 8192  # Triton interpreter (CPU): only tiny problems
WORKING_SET_TARGET = 1e9


@dataclass(frozen=True)
class KernelCase:
    """One op/mode at one shape: rows x latent (C, H, W); `tag` says official shape or sweep."""

    op: str  # "awm_loss" | "sde_sample" | "sde_logprob"
    mode: str  # "forward" | "backward" | "full"
    rows: int
    latent: tuple[int, int, int]
    tag: str

    @property
    def dims(self) -> int:
        return math.prod(self.latent)


def kernel_bytes(op: str, mode: str, rows: int, dims: int, s_x: int, s_v: int) -> int:
    """Bytes the op must move (see the module docstring); s_x, s_v: element sizes of x/target and v."""
    if rows < 1 or dims < 1 or s_x < 1 or s_v < 1:
        raise ValueError(f"rows={rows}, dims={dims}, s_x={s_x}, s_v={s_v} must all be >= 1")
    n = rows * dims
    if op == "awm_loss":
        fwd = n * (s_v + s_x + s_v + s_v + s_v) + rows * 4 * 6  # v, target, v_ref, v_ema in; dLoss/dv out
        bwd = 2 * n * s_v
    elif op == "sde_sample":
        if mode != "forward":
            raise ValueError("sde_sample has only the forward mode (rollouts run without autograd)")
        fwd, bwd = n * (3 * s_x + s_v) + rows * 4 * 3, 0
    elif op == "sde_logprob":
        fwd = n * (3 * s_x + s_v) + rows * 4 * 3
        bwd = n * (2 * s_x + 2 * s_v) + rows * 4
    else:
        raise ValueError(f"op={op!r} is not one of awm_loss, sde_sample, sde_logprob")
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd
    if mode == "full":
        return fwd + bwd
    raise ValueError(f"mode={mode!r} is not one of forward, backward, full")


def kernel_cases(device: torch.device, size: str, dtype_v: torch.dtype) -> list[KernelCase]:
    """size "full": official rows (6, 18, 72) x (16x64x64, 16x128x128) + a 1024 px sweep to >= 1 GB;
    "quick": official rows at both latents, no sweep past 144 rows; "cpu": small latents, the digits preset's
    loss shape and the SD3.5-M 512 px shape at 6 and 18 rows; "tiny": minimal."""
    if size == "tiny":
        shapes = [(6, (4, 8, 8), "cpu-tiny")]
    elif size == "cpu":
        shapes = [(r, lat, "cpu-small") for lat in ((16, 8, 8), (16, 16, 16)) for r in (6, 18)]
        shapes.append((72, (16, 16, 16), "cpu-small"))
        shapes.append((160, (1, 8, 8), "digits"))  # digits preset: micro-batch 40 x 4 timesteps of 1x8x8
        shapes += [(r, (16, 64, 64), "sd35m") for r in (6, 18)]  # SD3.5-M 512 px: rollout 6, micro-batch 3 x 6
    elif size in ("quick", "full"):
        shapes = [(r, lat, "official") for lat in ((16, 64, 64), (16, 128, 128)) for r in (6, 18, 72)]
        sizes = torch.tensor([], dtype=dtype_v).element_size()
        rows = 144
        while True:
            shapes.append((rows, (16, 128, 128), "sweep"))
            ws = kernel_bytes("awm_loss", "full", rows, 16 * 128 * 128, sizes, sizes)
            if ws >= WORKING_SET_TARGET or size == "quick":
                break
            rows *= 2
    else:
        raise ValueError(f"size={size!r} is not one of tiny, cpu, quick, full")
    cases = []
    for rows, lat, tag in shapes:
        for mode in ("forward", "backward", "full"):
            cases.append(KernelCase("awm_loss", mode, rows, lat, tag))
            cases.append(KernelCase("sde_logprob", mode, rows, lat, tag))
        cases.append(KernelCase("sde_sample", "forward", rows, lat, tag))
    return cases


def loss_working_set(case: KernelCase, dtype_x: torch.dtype, dtype_v: torch.dtype) -> int:
    """Bytes the AWM loss moves in full mode at the case's shape (the size the >= 64 MB targets are judged at)."""
    return kernel_bytes("awm_loss", "full", case.rows, case.dims, dtype_x.itemsize, dtype_v.itemsize)


def available_variants(device: torch.device, with_compile: bool) -> list[str]:
    """torch, torch_compile (if asked), then every other ops backend that runs on this device."""
    names = ["torch"] + (["torch_compile"] if with_compile else [])
    for b in BACKENDS:
        if b in ("auto", "torch"):
            continue
        if b == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                continue
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                continue
        if b in ("cpp", "cuda") and not backend_present(b, device.type):
            continue  # native ops: "cpp" on a CPU, "cuda" on a GPU, when the extension is built
        names.append(b)
    return names


class _Inputs:
    """Random inputs of one case (v requires grad)."""

    def __init__(self, case: KernelCase, device: torch.device, dtype_x: torch.dtype, dtype_v: torch.dtype,
                 gen: torch.Generator) -> None:
        shape = (case.rows, *case.latent)
        rnd = lambda dt: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dt)  # noqa: E731
        self.v = rnd(dtype_v).requires_grad_(True)
        self.target, self.v_ref, self.v_ema = rnd(dtype_x), rnd(dtype_v), rnd(dtype_v)
        self.x, self.x_next = rnd(dtype_x), rnd(dtype_x)
        self.t = torch.rand(case.rows, generator=gen, device=device) * 0.9 + 0.05
        self.adv = torch.rand(case.rows, generator=gen, device=device) * 2 - 1
        self.sigma = torch.full((case.rows,), SIGMA, device=device)
        self.sigma_next = torch.full((case.rows,), SIGMA_NEXT, device=device)
        self.out = torch.empty_like(self.x)


_COMPILED: dict[str, object] = {}


def _compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _forward_fn(case: KernelCase, variant: str, inp: _Inputs):
    """A closure running the op's forward for this variant; returns a differentiable scalar (or None)."""
    if case.op == "awm_loss":
        if variant == "torch_compile":
            f = _compiled("awm_loss", awm_loss_torch)
            o = LOSS_OPTIONS
            return lambda: f(inp.v, inp.target, inp.t, inp.adv, inp.v_ref, inp.v_ema, None, o["beta"], o["ema_beta"],
                             o["weighting"], o["ghuber_power"], o["clip_range"], o["kl_weighting"], o["ratio_mode"],
                             1)[0]
        return lambda: awm_loss(inp.v, inp.target, inp.t, inp.adv, v_ref=inp.v_ref, v_ema=inp.v_ema,
                                backend=variant, **LOSS_OPTIONS).loss
    if case.op == "sde_logprob":
        if variant == "torch_compile":
            f = _compiled("sde_logprob", sde_step_torch)
            return lambda: f(inp.x, inp.v, inp.sigma, inp.sigma_next, None, None, NOISE_LEVEL, "euler_maruyama",
                             None, 1.0, inp.x_next)[1].sum()
        return lambda: sde_step(inp.x, inp.v, inp.sigma, inp.sigma_next, x_next=inp.x_next, noise_level=NOISE_LEVEL,
                                backend=variant).log_prob.sum()
    v = inp.v.detach()
    if variant == "torch_compile":
        f = _compiled("sde_sample", sde_step_torch)
        return lambda: f(inp.x, v, inp.sigma, inp.sigma_next, None, None, NOISE_LEVEL, "euler_maruyama", None, 1.0,
                         None)[0]
    if variant in ("triton", "cuda", "cpp"):  # the fused path as a rollout uses it: in-kernel Philox noise,
        return lambda: sde_step(inp.x, v, inp.sigma, inp.sigma_next, seed=1234, out=inp.out,  # preallocated output
                                noise_level=NOISE_LEVEL, backend=variant).x_next
    return lambda: sde_step(inp.x, v, inp.sigma, inp.sigma_next, noise_level=NOISE_LEVEL, backend=variant).x_next


def _mode_fn(case: KernelCase, variant: str, inp: _Inputs):
    """The timed closure for the case's mode (Liger convention: backward re-runs y.backward(retain_graph))."""
    fwd = _forward_fn(case, variant, inp)
    if case.op == "sde_sample":
        def sample():
            with torch.no_grad():
                return fwd()
        return sample
    if case.mode == "forward":
        return fwd
    if case.mode == "backward":
        y = fwd()
        return lambda: y.backward(retain_graph=True)
    return lambda: fwd().backward()


def case_row(case: KernelCase, variant: str, dtype_x: torch.dtype, dtype_v: torch.dtype) -> dict:
    """The fields that name a measurement (and its byte count), before any timing."""
    return {"op": case.op, "mode": case.mode, "rows": case.rows, "latent": "x".join(map(str, case.latent)),
            "tag": case.tag, "variant": variant, "dtype_x": str(dtype_x).removeprefix("torch."),
            "dtype_v": str(dtype_v).removeprefix("torch."),
            "bytes": kernel_bytes(case.op, case.mode, case.rows, case.dims, dtype_x.itemsize, dtype_v.itemsize)}


def run_case(case: KernelCase, variant: str, device: torch.device, dtype_x: torch.dtype, dtype_v: torch.dtype,
             quick: bool, copy_gbps: float | None) -> dict:
    """One measurement row; a variant that cannot run (OOM, compile failure) gets status and no timing."""
    row = case_row(case, variant, dtype_x, dtype_v)
    numel = case.rows * case.dims
    if variant == "triton" and device.type != "cuda" and numel > INTERPRET_MAX_ELEMENTS:
        return {**row, "status": f"skipped: Triton interpreter only up to {INTERPRET_MAX_ELEMENTS} elements"}
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        # backward mode re-runs y.backward(retain_graph=True), which a compiled backward with donated buffers refuses
        with torch._functorch.config.patch(donated_buffer=False):
            inp = _Inputs(case, device, dtype_x, dtype_v, gen)
            fn = _mode_fn(case, variant, inp)
            fn()  # compile / autotune outside the timing
            peak = peak_memory_bytes(fn, device)
            timing = bench_kernel(fn, device, quick=quick, grad_to_none=[inp.v])
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "status": "oom"}
    except Exception as exc:  # a backend that fails here is reported, the run goes on
        return {**row, "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    gbps = row["bytes"] / (timing.median_ms * 1e-3) / 1e9
    return {**row, "status": "ok", **{k: v for k, v in timing.as_dict().items()}, "gbps": gbps,
            "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None, "peak_mem_bytes": peak}


def run_kernels(device: torch.device, size: str, quick: bool, with_compile: bool, copy_gbps: float | None,
                budget: Budget | None = None, min_bytes: float | None = None) -> list[dict]:
    """All cases x variants (official shapes first, then the sweep); adds `speedup_vs_torch` (median of the float64
    eager path / this median). A case due after `budget` is spent gets rows with the budget's status. `min_bytes`:
    only the shapes whose AWM loss (full mode) moves at least that many bytes (`loss_working_set`)."""
    dtype_v = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_x = torch.float32
    cases = kernel_cases(device, size, dtype_v)
    if min_bytes is not None:
        cases = [c for c in cases if loss_working_set(c, dtype_x, dtype_v) >= min_bytes]
    variants = available_variants(device, with_compile)
    rows = []
    for case in tqdm(cases, desc="kernels", unit="case", disable=None):
        if budget is not None and budget.spent():
            status = budget.skip()
            rows += [{**case_row(case, v, dtype_x, dtype_v), "status": status} for v in variants]
            continue
        for variant in variants:
            rows.append(run_case(case, variant, device, dtype_x, dtype_v, quick, copy_gbps))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return with_speedups(rows)


def with_speedups(rows: list[dict]) -> list[dict]:
    """`speedup_vs_torch` of every row: the float64 eager median of the same op, mode and shape over its median."""
    base = {(r["op"], r["mode"], r["rows"], r["latent"]): r.get("median_ms") for r in rows if r["variant"] == "torch"}
    for r in rows:
        ref = base.get((r["op"], r["mode"], r["rows"], r["latent"]))
        r["speedup_vs_torch"] = ref / r["median_ms"] if ref and r.get("median_ms") else None
    return rows
