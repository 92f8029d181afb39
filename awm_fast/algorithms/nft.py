"""DiffusionNFT (arXiv 2509.16117): implicit positive / negative policies around an "old" policy, trained on
the rollout's clean latents. Config section `nft` (config.NFTConfig); the loss math: the pure functions below.

Sampling: a deterministic rollout with the "old" policy (the "ema" adapter slot), solver nft.sampler (official
dpm2: 2nd-order multistep DPM-Solver++, sampling/dpm_solver.py; or Euler "ode"), sample.guidance_scale.

Update (one AdamW step per rollout): rows are (slot, sample) pairs, slot-major (row = j B + b): sample b
trains on K = int(N nft.timestep_fraction) of the rollout timesteps sigma_0 = 1 .. sigma_{N-1} (t = 0
excluded), the first K of its own random permutation (nft_timestep_indices; official 0.99: 9 of 10),
each row with fresh eps: x_t = (1 - t) x0 + t eps. The same rows go to the policy ("default" adapter, with
grad), the old policy and, when nft.kl_beta > 0, the reference (adapters disabled).

After each step the old policy moves: d = 0 for step < nft.decay_flat, then d = min(nft.decay_rate (step -
nft.decay_flat), nft.decay_cap) (official `return_decay` of scripts/train_nft_sd3.py, at its optimizer step count).
Official (NVlabs/DiffusionNFT config/nft.py): 10 steps, CFG 1, beta 1, kl 1e-4, decay_type 1 = min(0.001 step, 0.5);
OCR: decay_type 2 = flat 75, rate 0.0075, cap 0.999 (nft.decay_flat=75 nft.decay_rate=0.0075 nft.decay_cap=0.999).

The loss (the pure torch functions at the top of this module, computed in float64):

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

from awm_fast.algorithms.base import Algorithm, Rollout, Sampled, UpdateContext
from awm_fast.algorithms.update_loop import UpdateResult, run_update
from awm_fast.models.lora import EMA
from awm_fast.sampling.dpm_solver import dpm2_sample
from awm_fast.sampling.rollout import sample_latents

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


# --- the algorithm (the Algorithm contract, algorithms/base.py) ---------------------------------------------

OLD = EMA  # the "old" policy of DiffusionNFT lives in the "ema" adapter slot
NFT_SAMPLERS = ("dpm2", "ode")  # nft.sampler: the old policy's deterministic solver


def nft_rows(x0: torch.Tensor, times: torch.Tensor, fraction: float, generator: torch.Generator):
    """Training rows of B clean latents: (x_t, x0, t), each (K B, ...), row j B + b at t = times[idx[b, j]] with
    idx = nft_timestep_indices(B, len(times), fraction) and fresh eps per row (drawn after idx, same generator)."""
    batch = x0.shape[0]
    idx = nft_timestep_indices(batch, times.numel(), fraction, generator).to(times.device)
    t = times[idx.T.reshape(-1)]
    x0r = x0.repeat(idx.shape[1], *([1] * (x0.dim() - 1)))
    eps = torch.randn(x0r.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    tv = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tv) * x0r + tv * eps, x0r, t


class NFT(Algorithm):
    def sample(self, policy, cond, grid, generator, null_cond) -> Sampled:
        w = self.cfg.sample.guidance_scale
        if self.cfg.nft.sampler == "dpm2":
            return Sampled(dpm2_sample(policy, cond, grid, generator=generator, guidance_scale=w, null_cond=null_cond,
                                       adapter=OLD))
        x, _ = sample_latents(policy, cond, grid, sampler="ode", noise_level=0.0, generator=generator,
                              guidance_scale=w, null_cond=null_cond, adapter=OLD)
        return Sampled(x)

    def update(self, ctx: UpdateContext, roll: Rollout, advantages: torch.Tensor) -> UpdateResult:
        """advantages: (n,) in [-1, 1]. Loss parts averaged over the micro-batches, grad_norm, skipped."""
        tcfg, ncfg, latents = self.cfg.train, self.cfg.nft, roll.latents
        if advantages.shape != (latents.shape[0],):
            raise ValueError(f"advantages {tuple(advantages.shape)} must have one value per latent ({latents.shape[0]})")
        times = ctx.grid[:-1].to(latents.device, torch.float32)

        def loss_fn(idx: torch.Tensor, g: torch.Generator, _part: int):
            x_t, x0, t = nft_rows(latents[idx], times, ncfg.timestep_fraction, g)
            T = x0.shape[0] // idx.numel()
            c = roll.cond[idx].repeat(T)
            with torch.no_grad():
                v_old = ctx.policy.velocity(x_t, t, c, OLD).float()
                v_ref = ctx.policy.velocity(x_t, t, c, None).float() if ncfg.kl_beta > 0 else None
            v = ctx.policy.velocity(x_t, t, c).float()
            out = nft_loss(v, v_old, x_t, x0, t, advantages[idx].repeat(T), nft_beta=ncfg.beta, kl_beta=ncfg.kl_beta,
                           v_ref=v_ref, clip_max=tcfg.adv_clip_max)
            return out.loss, {"loss": out.loss.detach(), "policy_loss": out.policy_loss, "kl": out.kl,
                              "positive_loss": out.positive_loss, "negative_loss": out.negative_loss}

        return run_update(ctx, latents.shape[0], tcfg.micro_batch, tcfg.max_grad_norm, loss_fn, device=latents.device)

    def adapter_decay(self) -> tuple[float, float]:
        return self.cfg.nft.decay_rate, self.cfg.nft.decay_cap

    def decay_step(self, step: int) -> int:
        """max(0, step - nft.decay_flat): d = 0 (the old policy copies the policy) during the flat steps."""
        return max(0, step - self.cfg.nft.decay_flat)
