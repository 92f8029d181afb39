"""One Flow-GRPO optimizer step over a stored rollout (`awm_fast.sampling.trajectory`).

Rows are (sample, step) pairs of a micro-batch over the stochastic steps of each trajectory (all but the
last; with `train.grpo_sde_window` only the window). For each row the policy's log-prob of the stored
transition x_k -> x_{k+1} is recomputed with `awm_fast.ops.sde_step(..., x_next=x_{k+1})` (same sampler,
noise level and CFG as the rollout), the reference (adapters disabled) gives the KL mean, and
`awm_fast.algo.flow_grpo.flow_grpo_loss` the loss with A = clip(A_raw, -5, 5) (the trainer's advantages,
which are divided by adv_clip_max, times adv_clip_max). Gradients of all micro-batches are averaged into one
AdamW step with grad-norm clipping; a non-finite loss or gradient skips the step.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from awm_fast.algo.flow_grpo import flow_grpo_loss, transition_std
from awm_fast.config import SampleConfig, TrainConfig
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.ops import sde_step
from awm_fast.train.update_parts import finish_step


def flow_grpo_update(policy: FlowPolicy, trajectory: dict[str, torch.Tensor], cond: Conditioning,
                     advantages: torch.Tensor, grid: torch.Tensor, tcfg: TrainConfig, scfg: SampleConfig,
                     generator: torch.Generator, optimizer: torch.optim.Optimizer,
                     params: list[torch.nn.Parameter], null_cond: Conditioning | None = None) -> dict[str, float]:
    """trajectory: xs (n, N + 1, ...), log_probs (n, N), sde_mask (n, N). Returns mean loss parts and grad stats."""
    xs, old_lp, mask = trajectory["xs"], trajectory["log_probs"], trajectory["sde_mask"]
    n, mb = xs.shape[0], tcfg.micro_batch
    if advantages.shape != (n,) or n % mb:
        raise ValueError(f"advantages {tuple(advantages.shape)} must have one value per trajectory ({n}), "
                         f"and micro_batch {mb} must divide {n}")
    num_micro = n // mb
    adv_all = advantages.to(torch.float64) * tcfg.adv_clip_max
    sig = grid.to(xs.device, torch.float32)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(xs.device)
    sums: dict[str, float] = defaultdict(float)
    optimizer.zero_grad(set_to_none=True)
    for i in tqdm(range(num_micro), desc="train", unit="mb", leave=False, disable=None):
        idx = perm[i * mb:(i + 1) * mb]
        b, k = mask[idx].nonzero(as_tuple=True)
        rows = idx[b]
        x, x_next = xs[rows, k], xs[rows, k + 1]
        sigma, sigma_next = sig[k], sig[k + 1]
        velocity = GuidedVelocity(policy, cond[rows], scfg.guidance_scale, null_cond)
        v, v_uncond = velocity(x, sigma)
        step = sde_step(x, v, sigma, sigma_next, noise_level=scfg.noise_level, kind=scfg.sampler,
                        v_uncond=v_uncond, guidance_scale=scfg.guidance_scale, x_next=x_next, return_log_prob=True)
        mean_ref = std = None
        if tcfg.grpo_beta > 0:
            with torch.no_grad():
                r, r_uncond = velocity(x, sigma, adapter=None)
                mean_ref = sde_step(x, r, sigma, sigma_next, noise_level=scfg.noise_level, kind=scfg.sampler,
                                    v_uncond=r_uncond, guidance_scale=scfg.guidance_scale, x_next=x_next).mean
            std = transition_std(scfg.sampler, sigma, sigma_next, scfg.noise_level)
        out = flow_grpo_loss(step.log_prob, old_lp[rows, k], adv_all[rows], clip_range=tcfg.grpo_clip_range,
                             beta=tcfg.grpo_beta, mean=step.mean, mean_ref=mean_ref, std=std)
        (out.loss / num_micro).backward()
        for key, value in (("loss", out.loss.item()), ("policy_loss", out.policy_loss.item()),
                           ("kl", out.kl.item()), ("clipfrac", out.clipfrac.item()),
                           ("approx_kl", out.approx_kl.item()), ("log_prob", step.log_prob.mean().item())):
            sums[key] += value / num_micro
    return {**sums, **finish_step(optimizer, params, tcfg.max_grad_norm, sums["loss"])}
