"""Evaluation: deterministic ODE samples from fixed seeds on a fixed prompt list, scored by the reward."""
from __future__ import annotations

import torch

from awm_fast.algo.timesteps import time_grid
from awm_fast.models.policy import FlowPolicy
from awm_fast.rewards import Reward, check_reward_output
from awm_fast.sampling.rollout import sample_latents


@torch.no_grad()
def evaluate(policy: FlowPolicy, reward: Reward, prompts: list[str], metadata: list[dict], *, num_steps: int,
             shift: float, seed: int, batch_size: int, guidance_scale: float = 1.0, null_cond=None
             ) -> tuple[dict[str, float], torch.Tensor]:
    """Mean of every reward output over the prompts, and the decoded images (N, C, H, W) in [0, 1]."""
    grid = time_grid(num_steps, shift)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    sums: dict[str, float] = {}
    images = []
    for start in range(0, len(prompts), batch_size):
        p, m = prompts[start:start + batch_size], metadata[start:start + batch_size]
        latents, _ = sample_latents(policy, policy.encode(p), grid, sampler="ode", noise_level=0.0,
                                    generator=generator, guidance_scale=guidance_scale, null_cond=null_cond)
        img = policy.decode(latents)
        out = reward(img, p, m)
        check_reward_output(reward.name, out, len(p))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(torch.as_tensor(value).double().sum())
        images.append(img.cpu())
    return {k: v / len(prompts) for k, v in sums.items()}, torch.cat(images)
