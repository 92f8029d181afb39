"""GPU telemetry through NVML (nvidia-ml-py, imported as `pynvml`), sampled in a background thread.

`Telemetry(device_index)` as a context manager samples every `interval_s`: SM clock (MHz), memory used (MiB),
power (W), GPU utilisation (%). `summary()` gives mean / max of each. On a machine without NVML (no driver,
no GPU) `nvml_status()` says so in one line and the sampler records nothing.
"""
from __future__ import annotations

import threading
import time

import torch

_NVML: dict = {"ok": None, "why": ""}


def _nvml():
    """The initialised pynvml module, or None (the reason kept in _NVML["why"])."""
    if _NVML["ok"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML.update(ok=True, module=pynvml)
        except Exception as exc:  # no library, no driver, no device: all mean "no telemetry"
            _NVML.update(ok=False, why=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return _NVML.get("module") if _NVML["ok"] else None


def nvml_status() -> str:
    """One line: NVML available, or why not."""
    return "NVML available" if _nvml() is not None else f"NVML not available ({_NVML['why']}): no GPU telemetry"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def system_info(device: torch.device) -> dict:
    """GPU name, driver and CUDA versions (NVML and torch), plus the software versions of the run."""
    import platform

    info = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "nvml": nvml_status()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        info["gpu_name"] = None
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    nv = _nvml()
    if nv is not None:
        try:
            info["driver_version"] = _text(nv.nvmlSystemGetDriverVersion())
            cuda = nv.nvmlSystemGetCudaDriverVersion()
            info["cuda_driver_version"] = f"{cuda // 1000}.{(cuda % 1000) // 10}"
            if device.type == "cuda":
                handle = nv.nvmlDeviceGetHandleByIndex(device.index or 0)
                info["nvml_gpu_name"] = _text(nv.nvmlDeviceGetName(handle))
        except Exception as exc:
            info["nvml_error"] = f"{type(exc).__name__}: {exc}"
    return info


class Telemetry:
    """Background sampler of one GPU; a no-op (empty samples) without NVML or on a CPU device."""

    FIELDS = ("sm_clock_mhz", "memory_used_mib", "power_w", "gpu_util_pct")

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        nv = _nvml() if device.type == "cuda" else None
        self._nv = nv
        self._handle = nv.nvmlDeviceGetHandleByIndex(device.index or 0) if nv is not None else None

    def _sample(self) -> dict:
        nv, h = self._nv, self._handle
        return {"t": time.perf_counter(),
                "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                "memory_used_mib": nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "gpu_util_pct": nv.nvmlDeviceGetUtilizationRates(h).gpu}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception:  # a failed read (e.g. power not supported) ends sampling, never the benchmark
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Telemetry":
        if self._nv is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def summary(self) -> dict:
        """{"samples": n, field_mean, field_max ...}; the values are None when nothing was sampled."""
        out: dict = {"samples": len(self.samples)}
        for field in self.FIELDS:
            values = [s[field] for s in self.samples]
            out[f"{field}_mean"] = sum(values) / len(values) if values else None
            out[f"{field}_max"] = max(values) if values else None
        return out
