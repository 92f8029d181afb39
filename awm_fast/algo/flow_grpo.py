"""Flow-GRPO loss (arXiv 2505.05470) over stored SDE rollout transitions, in plain torch.

For a stored transition x -> x' of the rollout (sigma -> sigma', log-prob l_old when sampled) and the
current policy's log-prob l of the same x' (recomputed with `awm_fast.ops.sde_step(..., x_next=x')`):

    r      = exp(l - l_old)
    policy = mean_rows max(-A r, -A clip(r, 1 - c, 1 + c))          (A clipped to +-adv_clip_max, not scaled)
    kl     = mean_rows [ mean_dims (mean_theta - mean_ref)^2 / (2 std^2) ]
    loss   = policy + beta kl

mean_theta / mean_ref: the Gaussian means of the step under the policy and the reference (adapters
disabled); std: the official code's `std_dev_t` (`kl_std`): for Euler-Maruyama the noise scale per unit time
a sqrt(sigma / (1 - sigma~)), NOT the transition's std (which is that times sqrt(sigma - sigma')), for CPS the
transition's std. Official: c = 1e-4, beta 0.04 (GenEval, OCR).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GRPOLossOutput:
    """`loss` is a differentiable scalar; the rest are detached scalars."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def kl_std(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """The std that divides the mean-space KL (per row, float64): the official `std_dev_t`.

    euler_maruyama: a sqrt(sigma / (1 - sigma~)), sigma~ = sigma (sigma' where sigma == 1); the step's noise is
    this times sqrt(sigma - sigma'), which the official KL leaves out. cps: sigma' sin(a pi / 2), the step's noise.
    """
    s, s_next = sigma.to(torch.float64), sigma_next.to(torch.float64)
    if kind == "euler_maruyama":
        s_den = torch.where(s == 1, s_next, s)
        return noise_level * torch.sqrt(s / (1 - s_den))
    if kind == "cps":
        return s_next * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"kind={kind!r}: Flow-GRPO trains stochastic steps only (euler_maruyama or cps)")


def flow_grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *,
                   clip_range: float = 1e-4, beta: float = 0.0, mean: torch.Tensor | None = None,
                   mean_ref: torch.Tensor | None = None, std: torch.Tensor | None = None) -> GRPOLossOutput:
    """log_prob (differentiable), old_log_prob, advantages: (R,) per row; mean, mean_ref: (R, ...); std: (R,).

    With beta > 0, mean, mean_ref and std are required. Computed in float64.
    """
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.shape != log_prob.shape:
            raise ValueError(f"{name} must be 1-d with the shape of log_prob {tuple(log_prob.shape)}, got {tuple(x.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    f64 = torch.float64
    adv = advantages.to(f64)
    ratio = torch.exp(log_prob.to(f64) - old_log_prob.to(f64))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), dtype=f64, device=log_prob.device)
    if beta > 0:
        if mean is None or mean_ref is None or std is None:
            raise ValueError("beta > 0 needs mean, mean_ref and std")
        if mean.shape != mean_ref.shape or mean.shape[0] != log_prob.shape[0] or std.shape != log_prob.shape:
            raise ValueError(f"mean {tuple(mean.shape)}, mean_ref {tuple(mean_ref.shape)} and std {tuple(std.shape)} "
                             f"must match {log_prob.shape[0]} rows")
        dims = tuple(range(1, mean.dim()))
        kl = (((mean.to(f64) - mean_ref.to(f64)) ** 2).mean(dims) / (2 * std.to(f64) ** 2)).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > clip_range).to(f64).mean()
        approx_kl = 0.5 * ((log_prob.to(f64) - old_log_prob.to(f64)) ** 2).mean()
    return GRPOLossOutput(policy + beta * kl, policy.detach(), kl.detach(), clipfrac, approx_kl)
