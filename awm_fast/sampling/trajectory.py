"""Flow-GRPO rollouts: the SDE trajectory with every step's state and log-prob kept for training.

Steps k = 0 .. N-1 go from sigma_k to sigma_{k+1} with `awm_fast.ops.sde_step` (same CFG rule as
`sample_latents`). With sde_window = W > 0 (Flow-GRPO-Fast) only W consecutive steps starting at
k0 ~ U{0, ..., N // 2 - W} are stochastic (kind = sampler); the others are Euler ODE steps. (Official
yifan123/flow_grpo: sde_window_range = (0, num_steps // 2) in config/grpo.py, start =
random.randint(range[0], range[1] - W), both ends inclusive, in sd3_pipeline_with_logprob_fast.py; N = 10,
W = 3: k0 in {0, 1, 2}.)
The last step (sigma_N = 0) is always deterministic. `sde_mask` marks the stochastic steps: the ones trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awm_fast.models.lora import POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.ops import sde_step


@dataclass
class Trajectory:
    """xs: (B, N + 1, ...) states x_0 = noise .. x_N = sample; log_probs: (B, N); sde_mask: (B, N) bool."""

    xs: torch.Tensor
    log_probs: torch.Tensor
    sde_mask: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"xs": self.xs, "log_probs": self.log_probs, "sde_mask": self.sde_mask}


def sde_window_mask(num_steps: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """(N,) bool: all steps but the last when window == 0, else W consecutive steps starting at
    k0 ~ U{0, ..., N // 2 - W}."""
    if not 0 <= window <= num_steps // 2:
        raise ValueError(f"sde window {window} must be in [0, {num_steps // 2}] (= num_steps // 2) for {num_steps} steps")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if window == 0:
        mask[:-1] = True
        return mask
    high = num_steps // 2 - window
    start = int(torch.randint(0, high + 1, (1,), generator=generator, device=generator.device))
    mask[start:start + window] = True
    return mask


@torch.no_grad()
def sample_trajectory(policy: FlowPolicy, cond: Conditioning, grid: torch.Tensor, *, sampler: str,
                      noise_level: float, generator: torch.Generator, guidance_scale: float = 1.0,
                      null_cond: Conditioning | None = None, sde_window: int = 0,
                      adapter: str | None = POLICY) -> Trajectory:
    """One batch of rollouts with the states and per-step log-probs stored (see the module docstring)."""
    if sampler not in ("euler_maruyama", "cps"):
        raise ValueError(f"sampler={sampler!r}: a trajectory for Flow-GRPO needs euler_maruyama or cps")
    batch, num_steps = cond.embeds.shape[0], grid.numel() - 1
    velocity = GuidedVelocity(policy, cond, guidance_scale, null_cond)
    mask = sde_window_mask(num_steps, sde_window, generator)
    x = torch.randn((batch, *policy.latent_shape), generator=generator, device=policy.device, dtype=torch.float32)
    xs, log_probs = [x], []
    for k, (sigma, sigma_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        v_cond, v_uncond = velocity(x, sigma, adapter)
        step = sde_step(x, v_cond, sigma, sigma_next, generator=generator, noise_level=noise_level,
                        kind=sampler if mask[k] else "ode", v_uncond=v_uncond, guidance_scale=guidance_scale,
                        return_log_prob=True)
        x = step.x_next
        xs.append(x)
        log_probs.append(step.log_prob)
    return Trajectory(torch.stack(xs, 1), torch.stack(log_probs, 1), mask.to(policy.device).expand(batch, -1).clone())
