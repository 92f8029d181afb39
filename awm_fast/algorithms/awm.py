"""Advantage Weighted Matching (arXiv 2509.25050): the flow-matching loss of the policy's own samples,
reweighted by each sample's advantage, plus KL terms to the reference (base model) and the "ema" adapter.

Sampling: the policy's rollout with sample.sampler (official: SA-Solver, tau 0.4 inside [0.3, 0.9]) and
sample.guidance_scale; only the clean latents are kept.

Update (one AdamW step per rollout): for a micro-batch of B clean latents x0 with advantages A draw T =
train.num_timesteps training times (shared by the micro-batch, or per sample for timestep_sampling=uniform, as
official), then for every (timestep k, sample b) row (timestep-major, row = k B + b) fresh eps,
x_t = (1 - t) x0 + t eps and u = eps - x0. The same rows go to the policy ("default" adapter, with grad), the
reference (adapters disabled) and the "ema" adapter (three calls, or with train.shared_batch the policy call and
one no-grad call over the [ref; ema] rows: models.shared_batch); as in the official code both KL terms run only
when beta > 0 (`effective_ema_beta`), each with its own weighting (train.kl_weighting / kl_ema_weighting, official
kl_weight / kl_ema_weight; when they differ the EMA term is added outside the fused op: ops.awm_loss_torch.kl_rows).
`awm_fast.ops.awm_loss` turns the three velocities into the loss (weighting, clipping and KL forms in its
docstring). Micro-batches, their random numbers and DDP: algorithms.update_loop.

After the step the "ema" adapter moves with d = min(train.ema_decay_cap, train.ema_decay_rate step).
"""
from __future__ import annotations

import torch

from awm_fast.algorithms.base import Algorithm, Rollout, Sampled, UpdateContext
from awm_fast.algorithms.update_loop import UpdateResult, noisy_rows, run_update
from awm_fast.config import TrainConfig
from awm_fast.families import fast_path
from awm_fast.models.shared_batch import separate_velocities, shared_velocities
from awm_fast.ops import awm_loss
from awm_fast.ops.awm_loss_torch import kl_rows
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.timesteps import sample_train_timesteps


def effective_ema_beta(tcfg: TrainConfig) -> float:
    """The weight of the EMA KL term: the official code computes both KL terms only when beta > 0, so with
    beta = 0 the EMA term is off too, unless train.ema_kl_without_beta is set."""
    return tcfg.ema_beta if tcfg.beta > 0 or tcfg.ema_kl_without_beta else 0.0


class AWM(Algorithm):
    def sample(self, policy, cond, grid, generator, null_cond) -> Sampled:
        s = self.cfg.sample
        x, _ = sample_latents(policy, cond, grid, sampler=s.sampler, noise_level=s.noise_level, generator=generator,
                              guidance_scale=s.guidance_scale, null_cond=null_cond,
                              sa_noise_window=(s.sa_noise_t_min, s.sa_noise_t_max))
        return Sampled(x)

    def update(self, ctx: UpdateContext, roll: Rollout, advantages: torch.Tensor) -> UpdateResult:
        """Loss parts averaged over the micro-batches, grad_norm, skipped (1.0 when a non-finite step was dropped)."""
        tcfg, latents, cond = self.cfg.train, roll.latents, roll.cond
        grid = ctx.grid.to(latents.device)  # once per update: the micro-batches index it on the device

        def loss_fn(idx: torch.Tensor, g: torch.Generator, _part: int):
            return self.micro_batch_loss(ctx.policy, latents[idx], cond[idx], advantages[idx], grid, g)

        return run_update(ctx, latents.shape[0], tcfg.micro_batch, tcfg.max_grad_norm, loss_fn, device=latents.device)

    def micro_batch_loss(self, policy, x0: torch.Tensor, cond, advantages: torch.Tensor, grid: torch.Tensor,
                         g: torch.Generator, backend: str = "auto"):
        """(loss, parts) of one micro-batch of B clean latents x0 with their conditioning and advantages: T
        training times from `g`, the T B noisy rows, the policy / reference / EMA velocities and awm_loss
        (`backend`: its backend, ops.awm_loss). parts: 0-dim tensors."""
        tcfg, T = self.cfg.train, self.cfg.train.num_timesteps
        ema_beta = effective_ema_beta(tcfg)
        velocities = shared_velocities if fast_path(self.cfg, x0.device).shared_batch else separate_velocities
        t = sample_train_timesteps(tcfg.timestep_sampling, T, grid, shift=self.cfg.sample.shift,
                                   fraction=tcfg.timestep_fraction, generator=g, batch=x0.shape[0])
        xt, target, t_rows = noisy_rows(x0, t, g)
        v, v_ref, v_ema = velocities(policy, xt, t_rows, cond.repeat(T), need_ref=tcfg.beta > 0, need_ema=ema_beta > 0)
        own_ema = ema_beta > 0 and tcfg.kl_ema_weighting != tcfg.kl_weighting  # the EMA term outside the op
        out = awm_loss(v, target, t_rows, advantages.to(torch.float32).repeat(T), v_ref=v_ref,
                       v_ema=None if own_ema else v_ema, beta=tcfg.beta, ema_beta=0.0 if own_ema else ema_beta,
                       weighting=tcfg.weighting, ghuber_power=tcfg.ghuber_power, clip_range=tcfg.clip_range,
                       kl_weighting=tcfg.kl_weighting, ratio_mode=tcfg.ratio_mode, num_timesteps=T, backend=backend)
        total, kl, kl_ema = out.loss, out.kl.mean(), out.kl_ema.mean()
        if own_ema:
            ema_term = kl_rows(v, v_ema, t_rows, tcfg.kl_ema_weighting).mean()
            total, kl_ema = total + ema_beta * ema_term.to(total.dtype), ema_term.detach().float()
        loss = total.detach()
        return total, {"loss": loss, "policy_loss": loss - tcfg.beta * kl - ema_beta * kl_ema, "kl": kl,
                          "kl_ema": kl_ema, "clipfrac": out.clipfrac, "mse": out.mse.mean(),
                          "log_prob": out.log_prob.mean()}
