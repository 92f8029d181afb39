"""The RL algorithms the trainer runs (`train.algorithm`): how each samples and how each updates.

    awm        rollout with the policy (sample.sampler); AWM update on the clean latents (awm_update.py)
    flow_grpo  SDE rollout with the policy storing every state and log-prob (sampling/trajectory.py);
               update on the stored transitions, train.grpo_optimizer_steps (official 2) optimizer steps per
               rollout (flow_grpo_update.py); with CFG the unconditional prediction is detached in training.
               Official Flow-GRPO (yifan123/flow_grpo config/grpo.py geneval_sd3): euler_maruyama, noise 0.7,
               10 steps, CFG 4.5, clip 1e-4, beta 0.04. Flow-GRPO-Fast (geneval_sd3_fast_nocfg, preset
               geneval_sd35m_flow_grpo_fast): sample.sampler=cps, noise_level 0.8, guidance 1 (CFG off in
               rollout and training), train.grpo_sde_window=3 (window start in {0, ..., N // 2 - 3}, only
               those steps trained), grpo_clip_range 1e-5, grpo_beta 0.
    nft        deterministic rollout with the "old" policy = the "ema" adapter slot, solver train.nft_sampler
               (official dpm2: 2nd-order multistep DPM-Solver++, sampling/dpm_solver.py; or Euler "ode");
               update on the clean latents with fresh noise at int(N train.nft_timestep_fraction) (official
               0.99: 9 of 10) of the rollout timesteps per sample, a random permutation each (nft_update.py).
               Official (NVlabs/DiffusionNFT config/nft.py): 10 steps, CFG 1, nft_beta 1, kl 1e-4, old-policy
               decay min(0.001 step, 0.5).

After each optimizer step the trainer moves the "ema" adapter: ema <- d ema + (1 - d) theta with
d = min(cap, rate * step); (rate, cap) = (ema_decay_rate, ema_decay_cap) for awm and flow_grpo (unused by
the loss of flow_grpo), (nft_decay_rate, nft_decay_cap) for nft, where that adapter is the old policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from awm_fast.config import Config, TrainConfig
from awm_fast.models.lora import EMA
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.dpm_solver import dpm2_sample
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.trajectory import sample_trajectory
from awm_fast.train.awm_update import awm_update
from awm_fast.train.flow_grpo_update import flow_grpo_update
from awm_fast.train.nft_update import nft_update


@dataclass
class Rollout:
    """One step's rollout as the update sees it. Local to this rank: latents (n_local, ...) the clean samples,
    cond their conditioning, trajectory what the algorithm's sampler kept per sample ((n_local, ...) tensors:
    Flow-GRPO's xs, log_probs, sde_mask; empty otherwise). Gathered over all ranks (global order): rewards (n,)
    float64, groups (n,) prompt-group ids; `local` = this rank's slice of them. reward_parts: the mean of each
    reward part (combined rewards). Seconds: sampling, scoring (summed over the reward threads), waiting for
    the last scores."""

    latents: torch.Tensor
    cond: Conditioning
    rewards: torch.Tensor
    groups: torch.Tensor
    local: slice
    reward_parts: dict[str, float] = field(default_factory=dict)
    trajectory: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_s: float = 0.0
    reward_s: float = 0.0
    reward_wait_s: float = 0.0


NFT_SAMPLERS = ("dpm2", "ode")  # train.nft_sampler: the old policy's deterministic solver


@dataclass(frozen=True)
class Algorithm:
    """sample(policy, cond, grid, cfg, generator, null_cond) -> (x0 (B, ...), extras: dict of (B, ...) tensors);
    update(policy, roll: Rollout, advantages, grid, cfg, rng: MicroBatchRNG, optimizer, params, null_cond)
        -> UpdateResult (train/update_parts.py);
    adapter_decay(train config) -> (rate, cap) of the "ema" adapter's move."""

    name: str
    sample: Callable
    update: Callable
    adapter_decay: Callable[[TrainConfig], tuple[float, float]]


def _sample_policy(policy: FlowPolicy, cond: Conditioning, grid, cfg: Config, generator, null_cond):
    s = cfg.sample
    x, _ = sample_latents(policy, cond, grid, sampler=s.sampler, noise_level=s.noise_level, generator=generator,
                          guidance_scale=s.guidance_scale, null_cond=null_cond,
                          sa_noise_window=(s.sa_noise_t_min, s.sa_noise_t_max))
    return x, {}


def _sample_trajectory(policy: FlowPolicy, cond: Conditioning, grid, cfg: Config, generator, null_cond):
    s = cfg.sample
    traj = sample_trajectory(policy, cond, grid, sampler=s.sampler, noise_level=s.noise_level, generator=generator,
                             guidance_scale=s.guidance_scale, null_cond=null_cond, sde_window=cfg.train.grpo_sde_window)
    return traj.xs[:, -1], traj.as_dict()


def _sample_old(policy: FlowPolicy, cond: Conditioning, grid, cfg: Config, generator, null_cond):
    if cfg.train.nft_sampler == "dpm2":
        return dpm2_sample(policy, cond, grid, generator=generator, guidance_scale=cfg.sample.guidance_scale,
                           null_cond=null_cond, adapter=EMA), {}
    x, _ = sample_latents(policy, cond, grid, sampler="ode", noise_level=0.0, generator=generator,
                          guidance_scale=cfg.sample.guidance_scale, null_cond=null_cond, adapter=EMA)
    return x, {}


def _update_awm(policy, roll: Rollout, advantages, grid, cfg, rng, optimizer, params, null_cond):
    return awm_update(policy, roll.latents, roll.cond, advantages, grid, cfg.train, cfg.sample, rng, optimizer, params)


def _update_flow_grpo(policy, roll: Rollout, advantages, grid, cfg, rng, optimizer, params, null_cond):
    return flow_grpo_update(policy, roll.trajectory, roll.cond, advantages, grid, cfg.train, cfg.sample, rng,
                            optimizer, params, null_cond)


def _update_nft(policy, roll: Rollout, advantages, grid, cfg, rng, optimizer, params, null_cond):
    return nft_update(policy, roll.latents, roll.cond, advantages, grid, cfg.train, cfg.sample, rng, optimizer, params)


ALGORITHMS = {
    "awm": Algorithm("awm", _sample_policy, _update_awm, lambda t: (t.ema_decay_rate, t.ema_decay_cap)),
    "flow_grpo": Algorithm("flow_grpo", _sample_trajectory, _update_flow_grpo,
                           lambda t: (t.ema_decay_rate, t.ema_decay_cap)),
    "nft": Algorithm("nft", _sample_old, _update_nft, lambda t: (t.nft_decay_rate, t.nft_decay_cap)),
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"train.algorithm={name!r} is not one of {tuple(ALGORITHMS)}")
    return ALGORITHMS[name]


def merge_extras(extras: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the per-batch extras of a rollout along the batch dimension."""
    return {k: torch.cat([e[k] for e in extras]) for k in extras[0]} if extras else {}
