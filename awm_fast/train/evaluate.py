"""Evaluation: deterministic ODE samples from fixed seeds on a fixed prompt list, scored by the reward.

Sample i starts from noise x_1 seeded by (seed, "eval", i) alone (`per_sample_noise`) and the ODE adds no
noise, so a sample does not depend on the batch size or on how many processes share the work: before/after and
run/run comparisons hold across both. On N ranks, rank r evaluates batches r, r + N, ...; the reward sums are gathered
on every rank and the images (uint8) on rank 0; the other ranks return an empty tensor. Videos (N, F, C, H, W)
are scored as rewards.base.score_batch says (by frame, or whole clips) and returned as frame strips (N, C, H, k W)
(train.previews); with `preview_dir`, rank 0 also writes GIFs and frames of the first videos there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from awm_fast.models.policy import FlowPolicy
from awm_fast.rewards import Reward, check_reward_output
from awm_fast.rewards.base import evaluation_mode, is_video, score_batch
from awm_fast.sampling.rollout import per_sample_noise, sample_latents
from awm_fast.train.distributed import Dist, current
from awm_fast.train.previews import frame_strip, write_previews
from awm_fast.algorithms.update_loop import derived_seed


@dataclass
class Evaluation:
    """metrics: the mean of every reward output over the prompts; images (N, C, H, W) in [0, 1] and rewards (N,)
    (each sample's "reward" output) on rank 0, empty on the other ranks."""
    metrics: dict[str, float]
    images: torch.Tensor
    rewards: torch.Tensor


@torch.no_grad()
def evaluate(policy: FlowPolicy, reward: Reward, prompts: list[str], metadata: list[dict], *, num_steps: int,
             seed: int, batch_size: int, guidance_scale: float = 1.0, null_cond=None,
             dist: Dist | None = None, preview_dir: Path | None = None) -> Evaluation:
    """The evaluation of `policy` on `prompts` (see `Evaluation`)."""
    dist = dist or current()
    grid = policy.time_grid(num_steps)  # the model scheduler's grid
    sums: dict[str, float] = {}
    images: dict[int, torch.Tensor] = {}
    rewards: dict[int, torch.Tensor] = {}
    starts = list(range(0, len(prompts), batch_size))
    # sharded full fine-tuning: every rank must make the same calls (each gathers weights from all ranks), so
    # a rank short of a batch samples a discarded one-prompt batch
    lockstep = policy.finetune.lockstep_eval and dist.enabled
    rounds = -(-len(starts) // dist.world) * dist.world if lockstep else len(starts)
    for k in range(dist.rank, rounds, dist.world):
        if k >= len(starts):
            sample_latents(policy, policy.encode(prompts[:1]), grid, sampler="ode", noise_level=0.0,
                           generator=torch.Generator(device=policy.device).manual_seed(0),
                           guidance_scale=guidance_scale, null_cond=null_cond)
            continue
        start = starts[k]
        p, m = prompts[start:start + batch_size], metadata[start:start + batch_size]
        generator = torch.Generator(device=policy.device).manual_seed(derived_seed(seed, "eval", k))
        noise = per_sample_noise(policy.latent_shape, [derived_seed(seed, "eval", i) for i in
                                                        range(start, start + len(p))], policy.device)
        latents, _ = sample_latents(policy, policy.encode(p), grid, sampler="ode", noise_level=0.0,
                                    generator=generator, guidance_scale=guidance_scale, null_cond=null_cond,
                                    initial_noise=noise)
        img = policy.decode(latents)
        with evaluation_mode(reward):
            out = score_batch(reward, img, p, m)
        check_reward_output(reward.name, out, len(p))
        rewards[k] = torch.as_tensor(out["reward"]).double().reshape(-1).cpu()
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(torch.as_tensor(value).double().sum())
        if is_video(img):
            if preview_dir is not None and dist.is_main:
                write_previews(img, preview_dir, p, first_index=start)
            img = frame_strip(img)
        images[k] = (img.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if dist.enabled:
        parts = dist.all_gather_object((sums, images, rewards), "gathering evaluation results")
        sums = {key: sum(s.get(key, 0.0) for s, _, _ in parts) for key in parts[0][0]}
        if not dist.is_main:
            return Evaluation({k: v / len(prompts) for k, v in sums.items()}, torch.empty(0), torch.empty(0))
        for _, imgs, rews in parts:
            images.update(imgs)
            rewards.update(rews)
    return Evaluation({k: v / len(prompts) for k, v in sums.items()},
                      torch.cat([images[k] for k in sorted(images)]).float() / 255,
                      torch.cat([rewards[k] for k in sorted(rewards)]))
