"""Rollout loops: start from noise at sigma = 1 and step down the shifted grid with `awm_fast.ops.sde_step`."""
from __future__ import annotations

import torch

from awm_fast.models.lora import POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.ops import sde_step
from awm_fast.ops.sde_step_torch import SDE_KINDS

SAMPLERS = (*SDE_KINDS, "sa_solver")  # sample.sampler: sde_step's kinds, or the SA-Solver


@torch.no_grad()
def sample_latents(
    policy: FlowPolicy,
    cond: Conditioning,
    grid: torch.Tensor,
    *,
    sampler: str,
    noise_level: float,
    generator: torch.Generator,
    guidance_scale: float = 1.0,
    null_cond: Conditioning | None = None,
    adapter: str | None = POLICY,
    sa_noise_window: tuple[float, float] = (0.3, 0.9),
    initial_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the final latents x0 (B, *latent_shape) and the summed per-step log-probs (B,).

    Classifier-free guidance runs when guidance_scale != 1: v = v_uncond + w (v_cond - v_uncond),
    with the conditional and unconditional rows in one transformer call.
    sampler="sa_solver": the stochastic Adams solver of `awm_fast.sampling.sa_solver` (noise tau = noise_level
    only where sa_noise_window[0] <= t <= sa_noise_window[1]); its log-probs are not defined (zeros).
    """
    if sampler == "sa_solver":
        from awm_fast.sampling.sa_solver import sa_solver_sample

        return sa_solver_sample(policy, cond, grid, tau=noise_level, noise_window=sa_noise_window,
                                generator=generator, guidance_scale=guidance_scale, null_cond=null_cond,
                                adapter=adapter, initial_noise=initial_noise)
    batch = cond.embeds.shape[0]
    velocity = GuidedVelocity(policy, cond, guidance_scale, null_cond)
    x = initial_noise.float() if initial_noise is not None else torch.randn(
        (batch, *policy.latent_shape), generator=generator, device=policy.device, dtype=torch.float32)
    log_prob = torch.zeros(batch, device=policy.device)
    for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):  # the (host) grid read once
        x, step_log_prob = rollout_step(velocity, x, sigma, sigma_next, sampler=sampler, noise_level=noise_level,
                                        generator=generator, guidance_scale=guidance_scale, adapter=adapter)
        log_prob += step_log_prob
    return x, log_prob


def rollout_step(velocity: GuidedVelocity, x: torch.Tensor, sigma: float, sigma_next: float, *, sampler: str,
                 noise_level: float, generator: torch.Generator, guidance_scale: float = 1.0,
                 adapter: str | None = POLICY) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step sigma -> sigma_next (Python floats): the transformer call(s) and `sde_step`; returns
    (x_next, the step's log-prob (B,)). Nothing is read back to the host or copied in from it (tested)."""
    v_cond, v_uncond = velocity(x, sigma, adapter)
    step = sde_step(x, v_cond, sigma, sigma_next, generator=generator, noise_level=noise_level, kind=sampler,
                    v_uncond=v_uncond, guidance_scale=guidance_scale, return_log_prob=True)
    return step.x_next, step.log_prob


def per_sample_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str) -> torch.Tensor:
    """x_1 (len(seeds), *shape): row i is N(0, I) drawn from a generator seeded by seeds[i] alone, so a sample's
    noise does not depend on the batch it is drawn in, the batch size or the number of processes."""
    rows = [torch.randn(shape, generator=torch.Generator(device=device).manual_seed(s), device=device,
                        dtype=torch.float32) for s in seeds]
    return torch.stack(rows)
