"""DiffusionNFT loss (arXiv 2509.16117): implicit positive / negative policies around an "old" policy.

Rows are (x_t, t) built from a rollout's clean x0 with fresh noise eps: x_t = (1 - t) x0 + t eps.
v: the policy velocity (with grad); v_old: the "old" policy (detached); v_ref: the reference (base model).
A is the group advantage already clipped to +-clip_max and divided by clip_max (in [-1, 1]); b = nft beta.

    r      = clip(A / 2 + 1 / 2, 0, 1)                  (optimality probability)
    v+     = b v + (1 - b) v_old;     v- = (1 + b) v_old - b v
    x0+-   = x_t - t v+-
    w+-    = stopgrad(mean_dims |x0+- - x0|) clamped >= 1e-5     (adaptive weights, per row)
    L+-    = mean_dims (x0+- - x0)^2 / w+-
    loss   = mean_rows [ clip_max (r L+ + (1 - r) L-) / b ] + kl_beta mean (v - v_ref)^2

Official: b = 1, kl_beta = 1e-4, clip_max = 5. After each optimizer step old <- d old + (1 - d) theta,
d = min(0.001 step, 0.5) (`awm_fast.models.lora.update_ema_adapter` on the adapter holding "old").

Training timesteps (`nft_timestep_indices`): each sample trains on K = int(N * fraction) of the N rollout
timesteps sigma_0 .. sigma_{N-1}, the first K of its own random permutation (official fraction 0.99: 9 of 10;
NVlabs/DiffusionNFT scripts/train_nft_sd3.py, `num_train_timesteps` and `perms_time`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_FLOOR = 1e-5


@dataclass
class NFTLossOutput:
    """`loss` is a differentiable scalar; the rest are detached scalars."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    positive_loss: torch.Tensor
    negative_loss: torch.Tensor


def optimality_probability(advantages: torch.Tensor) -> torch.Tensor:
    """r = clip(A / 2 + 1 / 2, 0, 1) for A already in [-1, 1] (clipped to +-clip_max and divided by it)."""
    return torch.clamp(advantages.to(torch.float64) / 2 + 0.5, 0, 1)


def nft_timestep_indices(batch: int, num_times: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, K) long, K = int(num_times * fraction): row b holds the first K entries of a random permutation of
    range(num_times), drawn independently per row (distinct timesteps within a sample, different across samples)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if batch < 1 or num_times < 1:
        raise ValueError(f"batch and num_times must be >= 1, got {batch}, {num_times}")
    k = int(num_times * fraction)
    if k < 1:
        raise ValueError(f"int(num_times {num_times} * fraction {fraction}) = 0 training timesteps")
    keys = torch.rand((batch, num_times), generator=generator, device=generator.device)
    return keys.argsort(dim=1)[:, :k]


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, *, nft_beta: float = 1.0, kl_beta: float = 1e-4,
             v_ref: torch.Tensor | None = None, clip_max: float = 5.0) -> NFTLossOutput:
    """v, v_old, x_t, x0 (and v_ref): (R, ...); t, advantages: (R,). Computed in float64."""
    for name, x in (("v_old", v_old), ("x_t", x_t), ("x0", x0)) + ((("v_ref", v_ref),) if v_ref is not None else ()):
        if not isinstance(x, torch.Tensor) or x.shape != v.shape:
            raise ValueError(f"{name} must be a tensor of v's shape {tuple(v.shape)}")
    for name, x in (("t", t), ("advantages", advantages)):
        if x.dim() != 1 or x.shape[0] != v.shape[0]:
            raise ValueError(f"{name} must have shape ({v.shape[0]},), got {tuple(x.shape)}")
    if not nft_beta > 0:
        raise ValueError(f"nft_beta must be > 0, got {nft_beta}")
    if kl_beta < 0 or not clip_max > 0:
        raise ValueError(f"kl_beta must be >= 0 and clip_max > 0, got {kl_beta}, {clip_max}")
    if kl_beta > 0 and v_ref is None:
        raise ValueError("kl_beta > 0 needs v_ref")
    f64 = torch.float64
    view = (-1,) + (1,) * (v.dim() - 1)
    dims = tuple(range(1, v.dim()))
    vd, vo, xt, x0d = v.to(f64), v_old.detach().to(f64), x_t.to(f64), x0.to(f64)
    tv = t.to(f64).reshape(view)
    r = optimality_probability(advantages)
    x0_pos = xt - tv * (nft_beta * vd + (1 - nft_beta) * vo)
    x0_neg = xt - tv * ((1 + nft_beta) * vo - nft_beta * vd)
    w_pos = (x0_pos - x0d).abs().mean(dims, keepdim=True).detach().clamp(min=WEIGHT_FLOOR)
    w_neg = (x0_neg - x0d).abs().mean(dims, keepdim=True).detach().clamp(min=WEIGHT_FLOOR)
    loss_pos = ((x0_pos - x0d) ** 2 / w_pos).mean(dims)
    loss_neg = ((x0_neg - x0d) ** 2 / w_neg).mean(dims)
    policy = (clip_max * (r * loss_pos + (1 - r) * loss_neg) / nft_beta).mean()
    kl = ((vd - v_ref.to(f64)) ** 2).mean() if kl_beta > 0 else torch.zeros((), dtype=f64, device=v.device)
    return NFTLossOutput(policy + kl_beta * kl, policy.detach(), kl.detach(), loss_pos.mean().detach(),
                         loss_neg.mean().detach())
