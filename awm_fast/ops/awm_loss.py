"""Public AWM loss: `awm_loss(...)` and the `AWMLoss` module; formulas in `awm_loss_torch`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from awm_fast.ops import _validate as chk
from awm_fast.ops.awm_loss_torch import KL_WEIGHTINGS, RATIO_MODES, WEIGHTINGS, awm_loss_torch
from awm_fast.ops.dispatch import resolve_backend


@dataclass
class AWMLossOutput:
    """`loss` is a differentiable scalar; the rest are detached per-row stats (clipfrac is a scalar)."""

    loss: torch.Tensor
    log_prob: torch.Tensor
    mse: torch.Tensor
    kl: torch.Tensor
    kl_ema: torch.Tensor
    clipfrac: torch.Tensor


def _check_inputs(v, target, t, advantages, v_ref, v_ema, old_log_prob, weighting, ghuber_power,
                  clip_range, kl_weighting, ratio_mode, num_timesteps) -> None:
    for name, x in (("v", v), ("target", target), ("t", t), ("advantages", advantages)):
        chk.check_float(name, x)
    if v.dim() < 2:
        raise ValueError(f"v must have shape (rows, ...) with at least 2 dims, got {tuple(v.shape)}")
    rows = v.shape[0]
    chk.check_same_shape("target", target, "v", v)
    for name, x in (("v_ref", v_ref), ("v_ema", v_ema)):
        if x is not None:
            chk.check_float(name, x)
            chk.check_same_shape(name, x, "v", v)
    chk.check_per_row("t", t, rows)
    chk.check_per_row("advantages", advantages, rows)
    if old_log_prob is not None:
        chk.check_float("old_log_prob", old_log_prob)
        chk.check_per_row("old_log_prob", old_log_prob, rows)
    chk.check_same_device({"v": v, "target": target, "t": t, "advantages": advantages, "v_ref": v_ref,
                           "v_ema": v_ema, "old_log_prob": old_log_prob})
    chk.check_choice("weighting", weighting, WEIGHTINGS)
    chk.check_choice("kl_weighting", kl_weighting, KL_WEIGHTINGS)
    chk.check_choice("ratio_mode", ratio_mode, RATIO_MODES)
    if not ghuber_power > 0:
        raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not isinstance(num_timesteps, int) or num_timesteps < 1 or rows % num_timesteps:
        raise ValueError(f"num_timesteps={num_timesteps!r} must be a positive int dividing the {rows} rows")
    chk.check_finite("advantages", advantages)  # AWM_FAST_DEBUG_CHECKS=1 only: it syncs


def awm_loss(
    v: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    *,
    v_ref: torch.Tensor | None = None,
    v_ema: torch.Tensor | None = None,
    old_log_prob: torch.Tensor | None = None,
    beta: float = 0.0,
    ema_beta: float = 0.0,
    weighting: str = "ghuber",
    ghuber_power: float = 0.25,
    clip_range: float = 1.0,
    kl_weighting: str = "uniform",
    ratio_mode: str = "exp_first",
    num_timesteps: int = 1,
    backend: str = "auto",
) -> AWMLossOutput:
    """Advantage-weighted flow-matching loss with KL to a reference and to an EMA anchor.

    v, target (= eps - x0), v_ref, v_ema: (R, ...) velocities, one row per (timestep, sample) pair.
    t, advantages, old_log_prob: (R,). old_log_prob=None means on-policy: ratio exactly 1 while the
    gradient still flows through log_prob. See `awm_fast.ops.awm_loss_torch` for the formulas.
    ratio_mode="sum_first" needs rows ordered timestep-major and num_timesteps = T.
    backend="triton" (default for CUDA tensors) runs the fused kernels of `awm_fast.kernels.awm_loss` as the
    custom op `torch.ops.awm_fast.awm_loss_triton`: fp32 accumulation for any input dtypes, dLoss/dv written
    during the forward, the loss as a float32 scalar (float64 for float64 v: every fused backend returns the loss
    in the inputs' precision, `torch_ops.loss_dtype`; the torch backend returns float64 for any input); gradients
    reach v, target, v_ref and v_ema, while t, advantages and old_log_prob are constants. Works under torch.compile(fullgraph=True).
    backend="cpp" (CPU tensors; the "auto" choice on CPU when the extension is built) and "cuda" run the same
    algorithm as the native op `torch.ops.awm_fast.awm_loss_native` (csrc/, `awm_fast.ops.native_backend`).
    """
    _check_inputs(v, target, t, advantages, v_ref, v_ema, old_log_prob, weighting, ghuber_power,
                  clip_range, kl_weighting, ratio_mode, num_timesteps)
    if not (math.isfinite(beta) and math.isfinite(ema_beta)):
        raise ValueError(f"beta={beta} and ema_beta={ema_beta} must be finite")
    chosen = resolve_backend(backend, v.device)
    args = (v, target, t, advantages, v_ref, v_ema, old_log_prob, float(beta), float(ema_beta), weighting,
            float(ghuber_power), float(clip_range), kl_weighting, ratio_mode, num_timesteps)
    if chosen == "triton":
        from awm_fast.ops.triton_backend import awm_loss_triton

        return AWMLossOutput(*awm_loss_triton(*args))
    if chosen in ("cpp", "cuda"):
        from awm_fast.ops.native_backend import awm_loss_native

        return AWMLossOutput(*awm_loss_native(*args))
    return AWMLossOutput(*awm_loss_torch(*args))


class AWMLoss(torch.nn.Module):
    """`nn.Module` wrapper holding the loss options; forward(v, target, t, advantages, **tensors)."""

    def __init__(self, *, beta: float = 0.0, ema_beta: float = 0.0, weighting: str = "ghuber",
                 ghuber_power: float = 0.25, clip_range: float = 1.0, kl_weighting: str = "uniform",
                 ratio_mode: str = "exp_first", num_timesteps: int = 1, backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(beta=beta, ema_beta=ema_beta, weighting=weighting, ghuber_power=ghuber_power,
                            clip_range=clip_range, kl_weighting=kl_weighting, ratio_mode=ratio_mode,
                            num_timesteps=num_timesteps, backend=backend)
        chk.check_choice("weighting", weighting, WEIGHTINGS)
        chk.check_choice("kl_weighting", kl_weighting, KL_WEIGHTINGS)

    def forward(self, v, target, t, advantages, v_ref=None, v_ema=None, old_log_prob=None) -> AWMLossOutput:
        return awm_loss(v, target, t, advantages, v_ref=v_ref, v_ema=v_ema, old_log_prob=old_log_prob,
                        **self.options)
