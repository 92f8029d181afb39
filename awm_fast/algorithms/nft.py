"""DiffusionNFT (arXiv 2509.16117): implicit positive / negative policies around an "old" policy, trained on
the rollout's clean latents. Config section `nft` (config.NFTConfig); the loss math: awm_fast.algo.nft.

Sampling: a deterministic rollout with the "old" policy (the "ema" adapter slot), solver nft.sampler (official
dpm2: 2nd-order multistep DPM-Solver++, sampling/dpm_solver.py; or Euler "ode"), sample.guidance_scale.

Update (one AdamW step per rollout): rows are (slot, sample) pairs, slot-major (row = j B + b): sample b
trains on K = int(N nft.timestep_fraction) of the rollout timesteps sigma_0 = 1 .. sigma_{N-1} (t = 0
excluded), the first K of its own random permutation (algo.nft.nft_timestep_indices; official 0.99: 9 of 10),
each row with fresh eps: x_t = (1 - t) x0 + t eps. The same rows go to the policy ("default" adapter, with
grad), the old policy and, when nft.kl_beta > 0, the reference (adapters disabled).

After each step the old policy moves: d = 0 for step < nft.decay_flat, then d = min(nft.decay_rate (step -
nft.decay_flat), nft.decay_cap) (official `return_decay` of scripts/train_nft_sd3.py, at its optimizer step count).
Official (NVlabs/DiffusionNFT config/nft.py): 10 steps, CFG 1, beta 1, kl 1e-4, decay_type 1 = min(0.001 step, 0.5);
OCR: decay_type 2 = flat 75, rate 0.0075, cap 0.999 (nft.decay_flat=75 nft.decay_rate=0.0075 nft.decay_cap=0.999).
"""
from __future__ import annotations

import torch

from awm_fast.algo.nft import nft_loss, nft_timestep_indices
from awm_fast.algorithms.base import Algorithm, Rollout, Sampled, UpdateContext
from awm_fast.algorithms.update_loop import UpdateResult, run_update
from awm_fast.models.lora import EMA
from awm_fast.sampling.dpm_solver import dpm2_sample
from awm_fast.sampling.rollout import sample_latents

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
