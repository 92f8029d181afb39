"""One rollout step from sigma to sigma_next (dt = sigma_next - sigma < 0) in plain PyTorch, float64 inside.

Optional classifier-free guidance first: v = v_uncond + w (v - v_uncond).

euler_maruyama (Flow-GRPO), noise level a:
    std  = a sqrt(sigma / (1 - sigma~)),  sigma~ = sigma, or sigma_next where sigma == 1
    mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
    x'   = mean + std sqrt(-dt) xi
    log p(x'|x) = mean_d [ -(x' - mean)^2 / (2 std^2 (-dt)) - log(std sqrt(-dt)) - log sqrt(2 pi) ]
cps (coefficients-preserving):
    std  = sigma_next sin(a pi / 2);  x0_hat = x - sigma v;  x1_hat = x + (1 - sigma) v
    mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat;  x' = mean + std xi
    log p = -mean_d (x' - mean)^2
ode (Euler): x' = mean = x + dt v, log p = 0.
A step that lands on sigma_next = 0 is always the deterministic Euler step with log p = 0.
"""
from __future__ import annotations

import math

import torch

SDE_KINDS = ("euler_maruyama", "cps", "ode")
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_step_torch(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    noise_level: float,
    kind: str,
    v_uncond: torch.Tensor | None,
    guidance_scale: float,
    x_next: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_next, log_prob (B,) float32, mean). sigma/sigma_next: (B,) tensors."""
    f64 = torch.float64
    rows = x.shape[0]
    view = (rows,) + (1,) * (x.dim() - 1)
    xd = x.to(f64)
    vd = v.to(f64)
    if v_uncond is not None:
        ud = v_uncond.to(f64)
        vd = ud + guidance_scale * (vd - ud)
    s = sigma.to(f64).reshape(view)
    s_next = sigma_next.to(f64).reshape(view)
    dt = s_next - s
    last = s_next == 0
    ode_mean = xd + dt * vd
    if kind == "euler_maruyama":
        s_den = torch.where(s == 1, s_next, s)
        std = noise_level * torch.sqrt(s / (1 - s_den))
        mean = xd * (1 + std**2 * dt / (2 * s)) + vd * (1 + std**2 * (1 - s) / (2 * s)) * dt
        scale = std * torch.sqrt(-dt)
    elif kind == "cps":
        scale = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat = xd - s * vd
        x1_hat = xd + (1 - s) * vd
        mean = (1 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next**2 - scale**2, min=0)) * x1_hat
    elif kind == "ode":
        mean = ode_mean
        scale = torch.zeros_like(s)
    else:
        raise ValueError(f"kind={kind!r} is not one of {SDE_KINDS}")
    mean = torch.where(last, ode_mean, mean)
    scale = torch.where(last, torch.zeros_like(scale), scale)
    if x_next is None:
        if noise is None and generator is None:  # randn(generator=None) fails to trace with dynamic shapes
            noise = torch.randn_like(x, dtype=torch.float32)
        elif noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        nxt = mean + scale * noise.to(f64)
    else:
        nxt = x_next.to(f64)
    dims = tuple(range(1, x.dim()))
    if kind == "euler_maruyama":
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        lp = (-(nxt - mean) ** 2 / (2 * safe**2) - torch.log(safe) - LOG_SQRT_2PI).mean(dims)
    elif kind == "cps":
        lp = -((nxt - mean) ** 2).mean(dims)
    else:
        lp = torch.zeros(rows, dtype=f64, device=x.device)
    lp = torch.where(last.reshape(rows), torch.zeros_like(lp), lp)
    out = nxt.to(x.dtype) if x_next is None else x_next
    return out, lp.to(torch.float32), mean.to(x.dtype)
