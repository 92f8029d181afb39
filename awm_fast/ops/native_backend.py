"""Native backends "cpp" (CPU) and "cuda": the C++/CUDA kernels of csrc/, registered by the extension
`awm_fast._C` as torch custom ops with the schemas of the Triton ops (awm_fast/ops/triton_backend.py):

    torch.ops.awm_fast.awm_loss_native   (loss, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs)
    torch.ops.awm_fast.sde_step_native   sampling: writes x' into `out` (contiguous), returns (log_prob, mean)
    torch.ops.awm_fast.sde_log_prob_native  log-prob mode: (log_prob, mean), differentiable in v, v_uncond, x, x'
    torch.ops.awm_fast.sde_log_prob_backward_native  its backward (grad_v, grad_v_uncond, grad_x, grad_x')

The same op runs the CPU kernels on CPU tensors and the CUDA kernels on CUDA tensors (TORCH_LIBRARY_IMPL per
dispatch key). The formulas are those of the Triton kernels: AWM loss with dLoss/dv written in the forward,

    grad_v = c_u (v - u) + c_ref (v - v_ref) + c_ema (v - v_ema)    (coefs = (c_u, c_ref, c_ema), see torch_ops)

and the SDE step mean = a_x x + a_v v~, x' = mean + scale xi, with in-kernel noise xi_i = randn(seed, offset + i)
(Philox 4x32-10 + Box-Muller, the integer stream of Triton's tl.randn). CPU: float32 math (float64 when every
latent input is float64), float64 row sums, coefs and the loss in float64 for float64 v; CUDA: float32 math
(float64 finalisation, the loss returned as float64 for float64 v). Autograd
and fake (meta) rules are registered here, in Python.

The library is `awm_fast._C` (built by setup.py), or the file named by AWM_FAST_NATIVE_LIB (e.g. the CMake
build's libawm_fast_ops.so). AWM_FAST_NO_EXT=1 disables it. `load()` runs once, when awm_fast.ops.dispatch is
imported (which records `available(...)` for "cpu" and "cuda" there, outside any torch.compile trace).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from awm_fast.ops.torch_ops import (awm_backward, awm_outputs_like, awm_setup_context, call_sde_step,
                                   sde_setup_context)

Tensor = torch.Tensor
OPS = ("awm_loss_native", "sde_step_native", "sde_log_prob_native", "sde_log_prob_backward_native")
_STATE: dict = {"loaded": None, "why": "", "warned": False, "available": {}}


def _registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("awm_fast::awm_loss_native", "CPU")
    except RuntimeError:  # the operator does not exist yet
        return False


def _find_library() -> tuple[str | None, str]:
    if os.environ.get("AWM_FAST_NO_EXT", "").strip() == "1":
        return None, "AWM_FAST_NO_EXT=1"
    path = os.environ.get("AWM_FAST_NATIVE_LIB", "").strip()
    if path:
        return (path, "") if os.path.isfile(path) else (None, f"AWM_FAST_NATIVE_LIB={path!r} is not a file")
    spec = importlib.util.find_spec("awm_fast._C")
    if spec is None or not spec.origin:
        return None, "awm_fast._C is not built (pip install --no-build-isolation -e . with a C++ compiler)"
    return spec.origin, ""


def load() -> bool:
    """Load the native ops once; False (with `why_unavailable()`) when they cannot be loaded."""
    if _STATE["loaded"] is None:
        ok, why = False, ""
        try:
            if _registered():
                ok = True
            else:
                path, why = _find_library()
                if path is not None:
                    torch.ops.load_library(path)
                    ok = _registered()
                    why = "" if ok else f"{path} registered no awm_fast::awm_loss_native"
        except (OSError, RuntimeError) as exc:
            why = f"loading the native library failed: {str(exc).splitlines()[0][:200]}"
        if ok:
            _register_python_rules()
        _STATE.update(loaded=ok, why=why)
    return _STATE["loaded"]


def why_unavailable() -> str:
    load()
    return _STATE["why"]


def available(device_type: str) -> bool:
    """Native kernels for this device type ("cpu" -> the C++ ops, "cuda" -> the CUDA ops) are loaded."""
    cache = _STATE["available"]
    if device_type not in cache:  # cached: after the first call this is a dict lookup (traceable by dynamo)
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        cache[device_type] = bool(load() and key is not None and
                                  torch._C._dispatch_has_kernel_for_dispatch_key("awm_fast::awm_loss_native", key))
    return cache[device_type]


def notice_fallback(device_type: str, chosen: str) -> None:
    """One line, once per process, when "auto" cannot use the native ops because they are not loaded."""
    if not _STATE["warned"] and not load():
        _STATE["warned"] = True
        warnings.warn(f"awm-fast: native ops unavailable ({why_unavailable()}); {device_type} uses {chosen}",
                      RuntimeWarning, stacklevel=3)


# ---- autograd and fake rules ----

def _awm_fake(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting, ghuber_power,
              clip_range, kl_weighting, ratio_mode, num_timesteps):
    return awm_outputs_like(v, coef_dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)


def _sde_step_fake(x, v, sigma, sigma_next, noise, v_uncond, out, noise_level, kind, guidance_scale, seed, offset):
    return x.new_empty((x.shape[0],), dtype=torch.float32), torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_log_prob_fake(x, v, sigma, sigma_next, v_uncond, x_next, noise_level, kind, guidance_scale):
    return x.new_empty((x.shape[0],), dtype=torch.float32), torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_backward_fake(x, v, sigma, sigma_next, v_uncond, x_next, g_lp, g_mean, noise_level, kind, guidance_scale,
                       need_x, need_xn):
    like = lambda a, need: (torch.empty_like(a, memory_format=torch.contiguous_format) if need  # noqa: E731
                            else x.new_empty((0,)))
    return like(v, True), like(v_uncond, v_uncond is not None), like(x, need_x), like(x_next, need_xn)


def _sde_backward(ctx, g_lp, g_mean):
    x, v, sigma, sigma_next, v_uncond, x_next = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g_lp is None and g_mean is None:
        return (None,) * 9
    gv, gvu, gx, gxn = torch.ops.awm_fast.sde_log_prob_backward_native(
        x, v, sigma, sigma_next, v_uncond, x_next, g_lp, g_mean, *ctx.options, need[0], need[5])
    return (gx if need[0] else None, gv, None, None, gvu if v_uncond is not None else None,
            gxn if need[5] else None, None, None, None)


def _register_python_rules() -> None:
    lib = torch.library
    lib.register_fake("awm_fast::awm_loss_native")(_awm_fake)
    lib.register_fake("awm_fast::sde_step_native")(_sde_step_fake)
    lib.register_fake("awm_fast::sde_log_prob_native")(_sde_log_prob_fake)
    lib.register_fake("awm_fast::sde_log_prob_backward_native")(_sde_backward_fake)
    lib.register_autograd("awm_fast::awm_loss_native", awm_backward, setup_context=awm_setup_context)
    lib.register_autograd("awm_fast::sde_log_prob_native", _sde_backward, setup_context=sde_setup_context)


# ---- the backend functions called by awm_loss / sde_step ----

def awm_loss_native(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting,
                    ghuber_power, clip_range, kl_weighting, ratio_mode, num_timesteps) -> tuple[Tensor, ...]:
    """Same arguments and returned tuple as `awm_loss_torch`; the loss is a scalar in `torch_ops.loss_dtype(v)`
    (float64 for float64 v, computed in float64 on CPU and CUDA; float32 otherwise)."""
    out = torch.ops.awm_fast.awm_loss_native(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta,
                                             weighting, ghuber_power, clip_range, kl_weighting, ratio_mode,
                                             num_timesteps)
    return out[:6]


def sde_step_native(x, v, sigma, sigma_next, noise, generator, noise_level, kind, v_uncond, guidance_scale, x_next,
                    seed=None, offset=0, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """Same arguments and returned tuple as `sde_step_torch`, plus seed / offset / out (see `sde_step`)."""
    ops = torch.ops.awm_fast
    return call_sde_step(ops.sde_step_native, ops.sde_log_prob_native,
                         lambda shape, device, dtype: torch.empty(shape, device=device, dtype=dtype), x, v, sigma,
                         sigma_next, noise, generator, noise_level, kind, v_uncond, guidance_scale, x_next, seed, offset,
                         out)
