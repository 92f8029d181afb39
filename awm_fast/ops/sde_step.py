"""Public rollout step: `sde_step(...)`; formulas in `awm_fast.ops.sde_step_torch`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awm_fast.ops import _validate as chk
from awm_fast.ops.dispatch import resolve_backend
from awm_fast.ops.sde_step_torch import SDE_KINDS, sde_step_torch


@dataclass
class SDEStepOutput:
    """x_next: (B, ...) in x's dtype; log_prob: (B,) float32; mean: the Gaussian mean of the step."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_level: float = 0.7,
    kind: str = "euler_maruyama",
    v_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    x_next: torch.Tensor | None = None,
    return_log_prob: bool = False,
    backend: str = "auto",
) -> SDEStepOutput:
    """One Euler-Maruyama / CPS / ODE step of the rollout (sigma, sigma_next: floats or (B,) tensors).

    Sampling mode draws x_next = mean + scale * noise (noise given, or drawn from `generator`).
    Log-prob mode (`x_next` given) returns the log-prob of that transition, differentiable in v.
    log_prob is filled with zeros unless `return_log_prob` or `x_next` is given.
    """
    chk.check_float("x", x)
    chk.check_float("v", v)
    chk.check_same_shape("v", v, "x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, ...) with at least 2 dims, got {tuple(x.shape)}")
    for name, other in (("noise", noise), ("v_uncond", v_uncond), ("x_next", x_next)):
        if other is not None:
            chk.check_float(name, other)
            chk.check_same_shape(name, other, "x", x)
    chk.check_same_device({"x": x, "v": v, "noise": noise, "v_uncond": v_uncond, "x_next": x_next})
    chk.check_choice("kind", kind, SDE_KINDS)
    if not 0 <= noise_level:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    rows = x.shape[0]
    sigma_t = chk.as_per_row("sigma", sigma, rows, x.device)
    sigma_next_t = chk.as_per_row("sigma_next", sigma_next, rows, x.device)
    chosen = resolve_backend(backend, x.device)
    args = (x, v, sigma_t, sigma_next_t, noise, generator, float(noise_level), kind, v_uncond,
            float(guidance_scale), x_next)
    if chosen == "triton":
        from awm_fast.ops.triton_backend import sde_step_triton

        out = sde_step_triton(*args)
    else:
        out = sde_step_torch(*args)
    return SDEStepOutput(*out)
