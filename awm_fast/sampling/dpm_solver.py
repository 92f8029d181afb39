"""Deterministic 2nd-order multistep DPM-Solver++ ("dpm2"): the rollout sampler of official DiffusionNFT.

Data prediction d_k = x_k - sigma_k v(x_k, sigma_k) on the grid sigma_0 > ... > sigma_N = 0, with
alpha = 1 - sigma and lambda = log(alpha / sigma) (lambda = -inf at sigma = 1, +inf at sigma = 0). Step k goes
sigma_k -> sigma_{k+1} with h = lambda_{k+1} - lambda_k, so exp(-h) = sigma_{k+1} alpha_k / (sigma_k alpha_{k+1}):

    first order (DDIM, eta 0):  x_{k+1} = (sigma_{k+1} / sigma_k) x_k + alpha_{k+1} (1 - exp(-h)) d_k
    second order (2M):          x_{k+1} = (sigma_{k+1} / sigma_k) x_k + alpha_{k+1} (1 - exp(-h)) (d_k + D1 / 2),
                                D1 = (d_k - d_{k-1}) / r,  r = h_0 / h,  h_0 = lambda_k - lambda_{k-1}

Step 0 and the last step (to sigma_N = 0, which returns the last x0 prediction d_{N-1}) are first order, every
other step second order. With sigma_0 = 1 the second step has h_0 = inf, so D1 = 0 there (what the official
float64 arithmetic gives too). Written as x_{k+1} = a_k x_k + b_k d_k + c_k d_{k-1} (`dpm2_coefficients`).

Official (NVlabs/DiffusionNFT flow_grpo/diffusers_patch/solver.py: run_sampling, dpm_step, ddim_update,
multistep_dpm_solver_second_order_update; config/nft.py: solver "dpm2", deterministic, guidance 1, 10 steps):
the grid is the pipeline scheduler's sigmas (N + 1 values, 0 appended). Known difference: the official rollout
passes the transformer timestep as integer `long(1000 sigma)`; here it is 1000 sigma (awm_fast.models.policy).
"""
from __future__ import annotations

import torch

from awm_fast.models.lora import POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity


def _check_grid(grid: torch.Tensor) -> torch.Tensor:
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a 1-d tensor of at least 2 sigmas, got {grid!r}")
    s = grid.detach().to("cpu", torch.float64)
    if not (s[-1] == 0 and (s[:-1] > 0).all() and (s[0] <= 1) and (s[1:] < s[:-1]).all()):
        raise ValueError(f"grid must decrease strictly from sigma_0 <= 1 to sigma_N = 0, got {s.tolist()}")
    return s


def dpm2_coefficients(grid: torch.Tensor) -> torch.Tensor:
    """(N, 3) float64 (a_k, b_k, c_k) with x_{k+1} = a_k x_k + b_k d_k + c_k d_{k-1} (see the module docstring)."""
    s = _check_grid(grid)
    n = s.numel() - 1
    alpha = 1 - s
    coef = torch.zeros(n, 3, dtype=torch.float64)
    lam = torch.log(alpha) - torch.log(s)  # -inf at sigma = 1; the last value (+inf) is never used below
    for k in range(n):
        a = s[k + 1] / s[k]
        exp_neg_h = s[k + 1] * alpha[k] / (s[k] * alpha[k + 1])
        b = alpha[k + 1] * (1 - exp_neg_h)
        if k == 0 or k == n - 1:
            coef[k] = torch.stack([a, b, torch.zeros((), dtype=torch.float64)])
            continue
        r_inv = (lam[k + 1] - lam[k]) / (lam[k] - lam[k - 1])  # h / h_0: 0 where sigma_{k-1} = 1
        coef[k] = torch.stack([a, b * (1 + r_inv / 2), -b * r_inv / 2])
    return coef


def dpm2_step(x: torch.Tensor, d: torch.Tensor, d_prev: torch.Tensor | None, coef: torch.Tensor) -> torch.Tensor:
    """x_{k+1} = a x + b d + c d_prev for one row (a, b, c) of `dpm2_coefficients` (d_prev unused where c = 0)."""
    a, b, c = (float(v) for v in coef)
    out = a * x + b * d
    if c != 0:
        if d_prev is None:
            raise ValueError(f"a second-order step (c = {c}) needs the previous x0 prediction d_prev")
        out = out + c * d_prev
    return out


@torch.no_grad()
def dpm2_sample(policy: FlowPolicy, cond: Conditioning, grid: torch.Tensor, *, generator: torch.Generator,
                guidance_scale: float = 1.0, null_cond: Conditioning | None = None,
                adapter: str | None = POLICY, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Final latents (B, *latent_shape) of the dpm2 ODE from x_0 = noise (drawn from `generator` like
    `sample_latents` when not given); v = v_uncond + w (v_cond - v_uncond) when guidance_scale != 1."""
    coef = dpm2_coefficients(grid)
    sig = grid.detach().to("cpu", torch.float64).tolist()
    batch = cond.embeds.shape[0]
    velocity = GuidedVelocity(policy, cond, guidance_scale, null_cond)
    if noise is None:
        noise = torch.randn((batch, *policy.latent_shape), generator=generator, device=policy.device,
                            dtype=torch.float32)
    x, d_prev = noise.to(policy.device, torch.float32), None
    for k in range(coef.shape[0]):
        v_cond, v_uncond = velocity(x, sig[k], adapter)
        v = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
        d = x - sig[k] * v
        x, d_prev = dpm2_step(x, d, d_prev, coef[k]), d
    return x
