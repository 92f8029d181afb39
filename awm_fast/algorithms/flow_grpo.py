"""Flow-GRPO (arXiv 2505.05470): PPO-style clipped policy gradient on stored SDE rollout transitions.
Config section `flow_grpo` (config.FlowGRPOConfig); the loss math: the pure functions below.

Sampling (`sample_trajectory`): steps k = 0 .. N-1 go from sigma_k to sigma_{k+1} with awm_fast.ops.sde_step
(sample.sampler euler_maruyama or cps, sample.noise_level, the rollout's CFG rule), every state and step
log-prob kept. With sde_window = W > 0 (Flow-GRPO-Fast) only W consecutive steps starting at
k0 ~ U{0, ..., N // 2 - W} are stochastic; the others are Euler ODE steps (official yifan123/flow_grpo:
sde_window_range = (0, num_steps // 2) in config/grpo.py, start = random.randint(range[0], range[1] - W), both
ends inclusive; N = 10, W = 3: k0 in {0, 1, 2}). The last step (to sigma_N = 0) is never trained; without a
window Euler-Maruyama still adds its noise there as the official rollout does (euler_maruyama_final;
its stored log-prob is 0), with a window it is an Euler step (official Fast: noise 0 outside the window), and a
CPS step to 0 has no noise. `sde_mask` marks the trained steps.

Update: rows are (sample, step) pairs of a micro-batch over the masked steps. For each row the policy's
log-prob of the stored transition x_k -> x_{k+1} is recomputed with sde_step(..., x_next=x_{k+1}) (same
sampler, noise level and CFG as the rollout). With CFG the policy's UNCONDITIONAL prediction is detached before
the combine v = v_uncond + w (v_cond - v_uncond) (official scripts/train_sd3.py `compute_log_prob`, detach added
in commit 2d76907 of 2025-07-15; a later revision, 74db691, combines without it; the Fast recipe trains without
CFG, so it is unaffected). The reference (adapters disabled) gives the KL mean; the loss uses
A = clip(A_raw, -5, 5) (the trainer's advantages, divided by adv_clip_max, times adv_clip_max).
Only the samples with A != 0 train (official; informative_samples): the n / micro_batch
micro-batches keep their number and shrink to k / M rows; as officially, each process filters its own samples, so
with flat groups the rows trained depend on how the samples split over processes. The shuffled samples are split
into flow_grpo.optimizer_steps parts (official 2), round robin
(algorithms.update_loop); from the second part on the policy has moved, so r != 1 and the ratio clip acts
(`clipfrac_later` says how often; `clipfrac_first` is on-policy, 0).

Official Flow-GRPO (config/grpo.py geneval_sd3): euler_maruyama, noise 0.7, 10 steps, CFG 4.5, clip 1e-4, beta
0.04. Flow-GRPO-Fast (geneval_sd3_fast_nocfg, preset geneval_sd35m_flow_grpo_fast): cps, noise 0.8, CFG off,
window 3, clip 1e-5, beta 0.

The loss (the pure torch functions at the top of this module, computed in float64):

For a stored transition x -> x' of the rollout (sigma -> sigma', log-prob l_old when sampled) and the
current policy's log-prob l of the same x' (recomputed with `awm_fast.ops.sde_step(..., x_next=x')`):

    r      = exp(l - l_old)
    policy = mean_rows max(-A r, -A clip(r, 1 - c, 1 + c))          (A clipped to +-adv_clip_max, not scaled)
    kl     = mean_rows [ mean_dims (mean_theta - mean_ref)^2 / (2 std^2) ]
    loss   = policy + beta kl

mean_theta / mean_ref: the Gaussian means of the step under the policy and the reference (adapters
disabled); std: the official code's `std_dev_t` (`kl_std`): for Euler-Maruyama the noise scale per unit time
a sqrt(sigma / (1 - sigma~)), NOT the transition's std (which is that times sqrt(sigma - sigma')), for CPS the
transition's std. Official: c = 1e-4, beta 0.04 (GenEval, OCR).

Which samples train (`informative_samples`, official scripts/train_sd3.py and train_sd3_fast.py): only those
with A != 0, the local k of them split into the same M micro-batches of k / M rows each (the loss is a mean over a
micro-batch, so a flat group no longer dilutes the others); when k is not a multiple of M (or is 0), M - k mod M
zero-advantage samples drawn at random join them.

The last rollout step of Euler-Maruyama (`euler_maruyama_final`, sigma -> 0, never trained) adds its noise as the
official `sde_step_with_logprob` does: std = a sqrt(sigma / (1 - sigma~)), mean = x (1 - std^2 / 2) -
v (sigma + std^2 (1 - sigma) / 2), x' = mean + std sqrt(sigma) xi.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from awm_fast.algorithms.base import Algorithm, Rollout, Sampled, UpdateContext
from awm_fast.algorithms.update_loop import UpdateResult, run_update
from awm_fast.models.lora import POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.ops import sde_step
from awm_fast.ops.sde_step_torch import SDE_KINDS


@dataclass
class GRPOLossOutput:
    """`loss` is a differentiable scalar; the rest are detached scalars."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def kl_std(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """The std that divides the mean-space KL (per row, float64): the official `std_dev_t`.

    euler_maruyama: a sqrt(sigma / (1 - sigma~)), sigma~ = sigma (sigma' where sigma == 1); the step's noise is
    this times sqrt(sigma - sigma'), which the official KL leaves out. cps: sigma' sin(a pi / 2), the step's noise.
    """
    s, s_next = sigma.to(torch.float64), sigma_next.to(torch.float64)
    if kind == "euler_maruyama":
        s_den = torch.where(s == 1, s_next, s)
        return noise_level * torch.sqrt(s / (1 - s_den))
    if kind == "cps":
        return s_next * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"kind={kind!r}: Flow-GRPO trains stochastic steps only (euler_maruyama or cps)")


def informative_samples(advantages: torch.Tensor, num_batches: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (ascending) of the samples an update trains: those with a non-zero advantage, plus
    M - k mod M random zero-advantage ones when their count k is not a multiple of M = num_batches (or is 0)."""
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-d (one per sample), got shape {tuple(advantages.shape)}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or not 1 <= num_batches <= advantages.numel():
        raise ValueError(f"num_batches={num_batches!r} must be an int in [1, {advantages.numel()}] (the samples)")
    keep = advantages != 0
    count = int(keep.sum())
    if count % num_batches or count == 0:
        zeros = (~keep).nonzero()[:, 0]
        need = num_batches - count % num_batches
        order = torch.randperm(zeros.numel(), generator=generator, device=generator.device).to(zeros.device)
        keep[zeros[order[:need]]] = True
    return keep.nonzero()[:, 0]


def euler_maruyama_final(x: torch.Tensor, v: torch.Tensor, sigma: float, noise_level: float,
                         noise: torch.Tensor) -> torch.Tensor:
    """The official Euler-Maruyama step from sigma to 0 (module docstring), in float64, returned in x's dtype."""
    if not 0 < sigma <= 1:
        raise ValueError(f"sigma={sigma!r} must be in (0, 1] for the last step to 0")
    s = torch.tensor(sigma, dtype=torch.float64)
    std = noise_level * torch.sqrt(s / (1 - s)) if sigma < 1 else torch.tensor(float(noise_level), dtype=torch.float64)
    mean = x.to(torch.float64) * (1 - std**2 / 2) - v.to(torch.float64) * (s + std**2 * (1 - s) / 2)
    return (mean + std * torch.sqrt(s) * noise.to(torch.float64)).to(x.dtype)


def flow_grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *,
                   clip_range: float = 1e-4, beta: float = 0.0, mean: torch.Tensor | None = None,
                   mean_ref: torch.Tensor | None = None, std: torch.Tensor | None = None) -> GRPOLossOutput:
    """log_prob (differentiable), old_log_prob, advantages: (R,) per row; mean, mean_ref: (R, ...); std: (R,).

    With beta > 0, mean, mean_ref and std are required. Computed in float64.
    """
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.shape != log_prob.shape:
            raise ValueError(f"{name} must be 1-d with the shape of log_prob {tuple(log_prob.shape)}, got {tuple(x.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    f64 = torch.float64
    adv = advantages.to(f64)
    ratio = torch.exp(log_prob.to(f64) - old_log_prob.to(f64))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), dtype=f64, device=log_prob.device)
    if beta > 0:
        if mean is None or mean_ref is None or std is None:
            raise ValueError("beta > 0 needs mean, mean_ref and std")
        if mean.shape != mean_ref.shape or mean.shape[0] != log_prob.shape[0] or std.shape != log_prob.shape:
            raise ValueError(f"mean {tuple(mean.shape)}, mean_ref {tuple(mean_ref.shape)} and std {tuple(std.shape)} "
                             f"must match {log_prob.shape[0]} rows")
        dims = tuple(range(1, mean.dim()))
        kl = (((mean.to(f64) - mean_ref.to(f64)) ** 2).mean(dims) / (2 * std.to(f64) ** 2)).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > clip_range).to(f64).mean()
        approx_kl = 0.5 * ((log_prob.to(f64) - old_log_prob.to(f64)) ** 2).mean()
    return GRPOLossOutput(policy + beta * kl, policy.detach(), kl.detach(), clipfrac, approx_kl)


# --- the algorithm (the Algorithm contract, algorithms/base.py) ---------------------------------------------

TRAJECTORY_SAMPLERS = tuple(k for k in SDE_KINDS if k != "ode")  # the stochastic steps with a log-prob each


@dataclass
class Trajectory:
    """xs: (B, N + 1, ...) states x_0 = noise .. x_N = sample; log_probs: (B, N); sde_mask: (B, N) bool."""

    xs: torch.Tensor
    log_probs: torch.Tensor
    sde_mask: torch.Tensor

    @classmethod
    def cat(cls, items: list["Trajectory"]) -> "Trajectory":
        return cls(*(torch.cat([getattr(t, k) for t in items]) for k in ("xs", "log_probs", "sde_mask")))


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
    if sampler not in TRAJECTORY_SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: a trajectory for Flow-GRPO needs one of {TRAJECTORY_SAMPLERS}")
    batch, num_steps = cond.embeds.shape[0], grid.numel() - 1
    velocity = GuidedVelocity(policy, cond, guidance_scale, null_cond)
    mask = sde_window_mask(num_steps, sde_window, generator)
    x = torch.randn((batch, *policy.latent_shape), generator=generator, device=policy.device, dtype=torch.float32)
    xs, log_probs = [x], []
    noisy_last = sampler == "euler_maruyama" and sde_window == 0
    for k, (sigma, sigma_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        v_cond, v_uncond = velocity(x, sigma, adapter)
        if noisy_last and sigma_next == 0:
            v = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x = euler_maruyama_final(x, v, sigma, noise_level, noise)
            xs.append(x)
            log_probs.append(torch.zeros(batch, device=x.device, dtype=torch.float32))
            continue
        step = sde_step(x, v_cond, sigma, sigma_next, generator=generator, noise_level=noise_level,
                        kind=sampler if mask[k] else "ode", v_uncond=v_uncond, guidance_scale=guidance_scale,
                        return_log_prob=True)
        x = step.x_next
        xs.append(x)
        log_probs.append(step.log_prob)
    return Trajectory(torch.stack(xs, 1), torch.stack(log_probs, 1), mask.to(policy.device).expand(batch, -1).clone())


class FlowGRPO(Algorithm):
    def sample(self, policy, cond, grid, generator, null_cond) -> Sampled:
        s = self.cfg.sample
        traj = sample_trajectory(policy, cond, grid, sampler=s.sampler, noise_level=s.noise_level, generator=generator,
                                 guidance_scale=s.guidance_scale, null_cond=null_cond,
                                 sde_window=self.cfg.flow_grpo.sde_window)
        return Sampled(traj.xs[:, -1], traj)

    def update(self, ctx: UpdateContext, roll: Rollout, advantages: torch.Tensor) -> UpdateResult:
        """Loss parts averaged over the micro-batches (clipfrac_first / clipfrac_later over the first / later
        optimizer steps'), the mean grad norm and the number of skipped optimizer steps."""
        traj, tcfg, scfg, g = roll.kept, self.cfg.train, self.cfg.sample, self.cfg.flow_grpo
        if not isinstance(traj, Trajectory):
            raise TypeError(f"flow_grpo updates on a stored Trajectory, got {type(traj).__name__}")
        xs, old_lp, mask = traj.xs, traj.log_probs, traj.sde_mask
        if advantages.shape != (xs.shape[0],):
            raise ValueError(f"advantages {tuple(advantages.shape)} must have one value per trajectory ({xs.shape[0]})")
        if xs.shape[0] % tcfg.micro_batch:
            raise ValueError(f"micro_batch {tcfg.micro_batch} must divide the {xs.shape[0]} local samples")
        kept = informative_samples(advantages, xs.shape[0] // tcfg.micro_batch, ctx.rng)
        kept_frac = torch.tensor(kept.numel() / xs.shape[0], dtype=torch.float64)
        adv_all = advantages.to(torch.float64) * tcfg.adv_clip_max
        sig = ctx.grid.to(xs.device, torch.float32)
        rollout_step = dict(noise_level=scfg.noise_level, kind=scfg.sampler, guidance_scale=scfg.guidance_scale)

        def loss_fn(pos: torch.Tensor, _gen: torch.Generator, part: int):
            idx = kept.to(pos.device)[pos]
            b, k = mask[idx].nonzero(as_tuple=True)
            rows = idx[b]
            x, x_next, sigma, sigma_next = xs[rows, k], xs[rows, k + 1], sig[k], sig[k + 1]
            velocity = GuidedVelocity(ctx.policy, roll.cond[rows], scfg.guidance_scale, ctx.null_cond)
            mean_ref = std = None
            if g.beta > 0:
                with torch.no_grad():
                    r, r_uncond = velocity(x, sigma, adapter=None)
                    mean_ref = sde_step(x, r, sigma, sigma_next, v_uncond=r_uncond, x_next=x_next, **rollout_step).mean
                std = kl_std(scfg.sampler, sigma, sigma_next, scfg.noise_level)
            v, v_uncond = velocity(x, sigma)
            v_uncond = None if v_uncond is None else v_uncond.detach()  # official: no gradient through uncond
            step = sde_step(x, v, sigma, sigma_next, v_uncond=v_uncond, x_next=x_next, return_log_prob=True,
                            **rollout_step)
            out = flow_grpo_loss(step.log_prob, old_lp[rows, k], adv_all[rows], clip_range=g.clip_range, beta=g.beta,
                                 mean=step.mean, mean_ref=mean_ref, std=std)
            parts = {"loss": out.loss.detach(), "policy_loss": out.policy_loss, "kl": out.kl,
                     "clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "log_prob": step.log_prob.detach().mean(),
                     "clipfrac_first" if part == 0 else "clipfrac_later": out.clipfrac, "kept": kept_frac}
            return out.loss, parts

        rows_per_micro = kept.numel() // (xs.shape[0] // tcfg.micro_batch)
        result = run_update(ctx, kept.numel(), rows_per_micro, tcfg.max_grad_norm, loss_fn,
                            optimizer_steps=g.optimizer_steps, device=xs.device)
        result.losses.setdefault("clipfrac_later", 0.0)
        return result
