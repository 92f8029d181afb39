"""One AWM optimizer step over a rollout batch: micro-batches, T timesteps each, accumulated gradients.

For a micro-batch of B clean latents x0 with advantages A: draw T training times (shared by the micro-batch,
or per sample for timestep_sampling=uniform, as official),
then for every (timestep k, sample b) row (timestep-major, row = k B + b) fresh eps, x_t = (1 - t) x0 + t eps
and u = eps - x0. The same rows go to the policy ("default" adapter, with grad), the reference (adapters
disabled) and the "ema" adapter (three calls, or with `train.shared_batch` the policy call and one no-grad call
over the [ref; ema] rows: the same FLOPs in two calls); as in the
official code, both KL terms run only when beta > 0 (`effective_ema_beta`);
`awm_fast.ops.awm_loss` turns the three velocities into the loss.
Gradients of all micro-batches are averaged into one AdamW step with grad-norm clipping.

Random numbers (`update_parts.micro_batches`, the trainer's `MicroBatchRNG`): micro-batch i takes the rows
[i mb, (i + 1) mb) in order (the trainer's sampler already shuffled the rollout) and draws its timesteps and
noise from `micro(i)`, seeded by the global micro-batch index: the same rows, times and noise on 1 or N
processes. Under DDP the gradient is all-reduced once, on the last micro-batch (`accumulate`); the loss is
divided by the local micro-batch count, and DDP averages over ranks, which is the mean over all micro-batches
of the step.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from awm_fast.algo.timesteps import sample_train_timesteps
from awm_fast.config import SampleConfig, TrainConfig
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.shared_batch import separate_velocities, shared_velocities
from awm_fast.ops import awm_loss
from awm_fast.train.update_parts import MicroBatchRNG, UpdateResult, accumulate, finish_step, micro_batches, noisy_rows


def effective_ema_beta(tcfg: TrainConfig) -> float:
    """The weight of the EMA KL term: the official code computes both KL terms only when beta > 0, so with
    beta = 0 the EMA term is off too, unless train.ema_kl_without_beta is set."""
    return tcfg.ema_beta if tcfg.beta > 0 or tcfg.ema_kl_without_beta else 0.0


def awm_update(policy: FlowPolicy, latents: torch.Tensor, cond: Conditioning, advantages: torch.Tensor,
               grid: torch.Tensor, tcfg: TrainConfig, scfg: SampleConfig, rng: MicroBatchRNG,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> UpdateResult:
    """Mean loss parts over micro-batches, grad_norm and skipped (1.0 when a non-finite step was dropped)."""
    n, mb, T = latents.shape[0], tcfg.micro_batch, tcfg.num_timesteps
    num_micro = n // mb
    sums: dict[str, float] = defaultdict(float)
    velocities = shared_velocities if tcfg.shared_batch else separate_velocities
    ema_beta = effective_ema_beta(tcfg)
    optimizer.zero_grad(set_to_none=True)
    for i, idx, g in micro_batches(n, mb, rng, latents.device):
        t = sample_train_timesteps(tcfg.timestep_sampling, T, grid, shift=scfg.shift,
                                   fraction=tcfg.timestep_fraction, generator=g, batch=idx.numel())
        xt, target, t_rows = noisy_rows(latents[idx], t, g)
        c = cond[idx].repeat(T)
        adv = advantages[idx].to(torch.float32).repeat(T)
        with accumulate(policy, last=i == num_micro - 1):
            v, v_ref, v_ema = velocities(policy, xt, t_rows, c, need_ref=tcfg.beta > 0, need_ema=ema_beta > 0)
            out = awm_loss(v, target, t_rows, adv, v_ref=v_ref, v_ema=v_ema, beta=tcfg.beta, ema_beta=ema_beta,
                           weighting=tcfg.weighting, ghuber_power=tcfg.ghuber_power, clip_range=tcfg.clip_range,
                           kl_weighting=tcfg.kl_weighting, ratio_mode=tcfg.ratio_mode, num_timesteps=T)
            (out.loss / num_micro).backward()
        kl, kl_ema = out.kl.mean().item(), out.kl_ema.mean().item()
        loss = out.loss.item()
        for key, value in (("loss", loss), ("policy_loss", loss - tcfg.beta * kl - ema_beta * kl_ema),
                           ("kl", kl), ("kl_ema", kl_ema), ("clipfrac", out.clipfrac.item()),
                           ("mse", out.mse.mean().item()), ("log_prob", out.log_prob.mean().item())):
            sums[key] += value / num_micro
    grad_norm, skipped = finish_step(optimizer, params, tcfg.max_grad_norm, sums["loss"])
    return UpdateResult(dict(sums), grad_norm, float(skipped))
