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

Which samples train (`informative_samples`, official scripts/train_sd3.py and train_sd3_fast.py): only those
with A != 0, the local k of them split into the same M micro-batches of k / M rows each (the loss is a mean over a
micro-batch, so a flat group no longer dilutes the others); when k is not a multiple of M (or is 0), M - k mod M
zero-advantage samples drawn at random join them.

The last rollout step of Euler-Maruyama (`euler_maruyama_final`, sigma -> 0, never trained) adds its noise as the
official `sde_step_with_logprob` does: std = a sqrt(sigma / (1 - sigma~)), mean = x (1 - std^2 / 2) -
v (sigma + std^2 (1 - sigma) / 2), x' = mean + std sqrt(sigma) xi.
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


def informative_samples(advantages: torch.Tensor, num_batches: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (ascending) of the samples an update trains: those with a non-zero advantage, plus
    M - k mod M random zero-advantage ones when their count k is not a multiple of M = num_batches (or is 0)."""
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-d (one per sample), got shape {tuple(advantages.shape)}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or not 1 <= num_batches <= advantages.numel():
        raise ValueError(f"num_batches={num_batches!r} must be an int in [1, {advantages.numel()}] (the samples)")
    keep = advantages != 0
    count = int(keep.sum())
    if count % num_batches or count == 0:
        zeros = (~keep).nonzero()[:, 0]
        need = num_batches - count % num_batches
        order = torch.randperm(zeros.numel(), generator=generator, device=generator.device).to(zeros.device)
        keep[zeros[order[:need]]] = True
    return keep.nonzero()[:, 0]


def euler_maruyama_final(x: torch.Tensor, v: torch.Tensor, sigma: float, noise_level: float,
                         noise: torch.Tensor) -> torch.Tensor:
    """The official Euler-Maruyama step from sigma to 0 (module docstring), in float64, returned in x's dtype."""
    if not 0 < sigma <= 1:
        raise ValueError(f"sigma={sigma!r} must be in (0, 1] for the last step to 0")
    s = torch.tensor(sigma, dtype=torch.float64)
    std = noise_level * torch.sqrt(s / (1 - s)) if sigma < 1 else torch.tensor(float(noise_level), dtype=torch.float64)
    mean = x.to(torch.float64) * (1 - std**2 / 2) - v.to(torch.float64) * (s + std**2 * (1 - s) / 2)
    return (mean + std * torch.sqrt(s) * noise.to(torch.float64)).to(x.dtype)


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
