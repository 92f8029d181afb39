"""Timers, peak memory and the two roofline calibrations (copy bandwidth, matmul rate) of the harness.

Every timing is a median with the 20th and 80th percentiles, in milliseconds:
- kernels on CUDA: `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (CUDA events around each run,
  the L2 cache flushed before each run); without triton, the same with torch.cuda events;
- phases on CUDA (seconds per call): torch.cuda events around each of a fixed number of runs;
- on a CPU: `time.perf_counter` around each run (a wall-clock timer; CPU work is synchronous).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    """median / p20 / p80 in milliseconds over `reps` timed runs (after warm-up), and how they were taken."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list (q in [0, 1])."""
    if not values:
        raise ValueError("quantile of an empty list")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: list[float], timer: str) -> Timing:
    return Timing(statistics.median(times_ms), quantile(times_ms, 0.2), quantile(times_ms, 0.8), len(times_ms), timer)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int,
              setup: Callable[[], object] | None = None) -> Timing:
    """Time `reps` calls of fn after `warmup` untimed ones; `setup()` (untimed) runs before each call.

    CUDA: one pair of torch.cuda events per run; CPU: perf_counter per run.
    """
    if warmup < 0 or reps < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and reps={reps} >= 1")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "cuda-events" if device.type == "cuda" else "cpu-wallclock")


def bench_kernel(fn: Callable[[], object], device: torch.device, *, quick: bool,
                 grad_to_none: list[torch.Tensor] | None = None) -> Timing:
    """Median and 20/80 quantiles of a short kernel call: do_bench on CUDA, a wall-clock loop on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            rep = 50 if quick else 200
            med, p20, p80 = do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
            return Timing(float(med), float(p20), float(p80), -1, "triton.do_bench")

    def reset_grads() -> None:
        for x in grad_to_none or ():
            x.grad = None

    reps = 5 if quick else 30
    return time_runs(fn, device, warmup=1 if quick else 3, reps=reps, setup=reset_grads)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated bytes above what was allocated before one call of fn (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def copy_bandwidth(device: torch.device, nbytes: int, *, quick: bool) -> dict:
    """Device-to-device copy rate: dst.copy_(src) moves 2 * nbytes (read + write); GB/s = 1e9 bytes/s."""
    if nbytes < 1024:
        raise ValueError(f"nbytes={nbytes} is too small to measure a copy")
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench_kernel(lambda: dst.copy_(src), device, quick=quick)
    moved = 2 * n * 4
    return {"bytes": moved, "timing": t.as_dict(), "gbps": moved / (t.median_ms * 1e-3) / 1e9}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, *, quick: bool) -> dict:
    """Dense (n x n) @ (n x n) rate on random data: 2 n^3 FLOP per call; TFLOP/s = 1e12 FLOP/s."""
    if n < 16:
        raise ValueError(f"n={n} is too small to measure a matmul")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = bench_kernel(lambda: a @ b, device, quick=quick)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "timing": t.as_dict(),
            "tflops": 2 * n**3 / (t.median_ms * 1e-3) / 1e12}


class Budget:
    """A wall-clock budget for a run (`--budget-s`): a unit of work (a kernel case, a phase variant, a phase model)
    starts only while time is left; one already running finishes, so a caller leaves a margin for the longest unit.
    `seconds=None` never runs out."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a time budget must be > 0 seconds, got {seconds}")
        self.seconds, self._clock = seconds, clock
        self._start = clock()
        self.skipped = 0

    def elapsed(self) -> float:
        return self._clock() - self._start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def skip(self) -> str:
        """Count one unit left out, and the status its rows carry."""
        self.skipped += 1
        return f"not run: time budget spent (--budget-s {self.seconds:g})"
