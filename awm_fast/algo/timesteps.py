"""Time grids for sampling and stratified training timesteps.

Sampling grid with N steps and shift s: sigma_i = s u_i / (1 + (s - 1) u_i), u_i = linspace(1, 0, N + 1).

Training timesteps (T per sample, one draw shared by a micro-batch):
- discrete_wo_init: boundaries b = int(linspace(1, floor(N * f), T + 1)); index k_j ~ U{b_j, ..., b_{j+1} - 1};
  t_j = sigma_{k_j} of the rollout grid (f = timestep_fraction, 0.9 officially).
- discrete: the same with boundaries starting at 0 (t = 1 allowed).
- uniform: stratified u_j ~ U[j / T, (j + 1) / T), shifted like the grid, clamped to [0.01, 0.99].
- logit_normal: u = sigmoid(n), n ~ N(0, 1), shifted, clamped >= 0.01.
"""
from __future__ import annotations

import math

import torch


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = s u / (1 + (s - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def time_grid(num_steps: int, shift: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The N + 1 decreasing sigmas from 1 to 0 of the rollout."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift).to(dtype)


def discrete_boundaries(num_steps: int, num_timesteps: int, fraction: float, with_init: bool) -> list[int]:
    """Stratum boundaries over the grid indices; raises ValueError when a stratum would be empty."""
    start = 0 if with_init else 1
    stop = math.floor(num_steps * fraction)
    bounds = torch.linspace(start, stop, num_timesteps + 1, dtype=torch.float64).to(torch.int64).tolist()
    if any(b1 <= b0 for b0, b1 in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{num_timesteps} strata do not fit in grid indices [{start}, {stop}) (boundaries {bounds})")
    return bounds


def sample_train_timesteps(
    mode: str, num_timesteps: int, grid: torch.Tensor, *, shift: float, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """T training times (float64, in (0, 1]) for one micro-batch."""
    num_steps = grid.numel() - 1
    if mode in ("discrete_wo_init", "discrete"):
        bounds = discrete_boundaries(num_steps, num_timesteps, fraction, mode == "discrete")
        dev = generator.device  # draws happen on the generator's device (a CUDA generator on GPU runs)
        idx = [int(torch.randint(lo, hi, (1,), generator=generator, device=dev)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        return grid.to(torch.float64)[idx]
    if mode == "uniform":
        draw = torch.rand(num_timesteps, generator=generator, dtype=torch.float64, device=generator.device).cpu()
        u = (torch.arange(num_timesteps, dtype=torch.float64) + draw) / num_timesteps
        return shift_time(u, shift).clamp(0.01, 0.99)
    if mode == "logit_normal":
        u = torch.sigmoid(torch.randn(num_timesteps, generator=generator, dtype=torch.float64, device=generator.device).cpu())
        return shift_time(u, shift).clamp(min=0.01)
    raise ValueError(f"timestep_sampling={mode!r} is not one of discrete_wo_init, discrete, uniform, logit_normal")
