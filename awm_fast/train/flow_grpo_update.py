"""Flow-GRPO optimizer steps over a stored rollout (`awm_fast.sampling.trajectory`).

Rows are (sample, step) pairs of a micro-batch over the stochastic steps of each trajectory (all but the
last; with `train.grpo_sde_window` only the window). For each row the policy's log-prob of the stored
transition x_k -> x_{k+1} is recomputed with `awm_fast.ops.sde_step(..., x_next=x_{k+1})` (same sampler,
noise level and CFG as the rollout). With CFG the policy's UNCONDITIONAL prediction is detached before the
combine v = v_uncond + w (v_cond - v_uncond): the gradient flows through the conditional branch only (official
yifan123/flow_grpo scripts/train_sd3.py `compute_log_prob`, detach added in commit 2d76907 of 2025-07-15; a later
revision, 74db691, combines without it; the Fast recipe trains without CFG, so it is unaffected). The reference
(adapters disabled) gives the KL mean, and `awm_fast.algo.flow_grpo.flow_grpo_loss` the loss with
A = clip(A_raw, -5, 5) (the trainer's advantages, which are divided by adv_clip_max, times adv_clip_max).

As in the official code, the shuffled samples are split into `train.grpo_optimizer_steps` equal parts (official
2: gradient accumulation over half the rollout's batches), part s = the micro-batches i with i mod steps = s
(round robin: every rank holds a multiple of `steps` micro-batches, so the parts are the same global micro-batches
on 1 or N processes); each part's micro-batch gradients are averaged
into one AdamW step with grad-norm clipping (a non-finite loss or gradient skips that step). From the second
part on the policy has moved, so r != 1 and the 1e-4 ratio clip acts (`clipfrac_later` says how often).
The rows are taken in order (`update_parts.micro_batches`; the trainer already shuffled the rollout);
under DDP the gradient is all-reduced once per optimizer step, on its last micro-batch (`accumulate`).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from awm_fast.algo.flow_grpo import flow_grpo_loss, kl_std
from awm_fast.config import SampleConfig, TrainConfig
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.ops import sde_step
from awm_fast.train.update_parts import MicroBatchRNG, UpdateResult, accumulate, finish_step, micro_batches

LOSS_KEYS = ("loss", "policy_loss", "kl", "clipfrac", "approx_kl", "log_prob")


def flow_grpo_update(policy: FlowPolicy, trajectory: dict[str, torch.Tensor], cond: Conditioning,
                     advantages: torch.Tensor, grid: torch.Tensor, tcfg: TrainConfig, scfg: SampleConfig,
                     rng: MicroBatchRNG, optimizer: torch.optim.Optimizer,
                     params: list[torch.nn.Parameter], null_cond: Conditioning | None = None) -> UpdateResult:
    """trajectory: xs (n, N + 1, ...), log_probs (n, N), sde_mask (n, N). Returns the loss parts averaged over
    every micro-batch, the clip fraction of the first optimizer step (`clipfrac_first`, on-policy: 0) and of the
    later ones (`clipfrac_later`; 0 with one step), the mean grad norm and the number of skipped optimizer steps."""
    xs, old_lp, mask = trajectory["xs"], trajectory["log_probs"], trajectory["sde_mask"]
    n, mb, steps = xs.shape[0], tcfg.micro_batch, tcfg.grpo_optimizer_steps
    if advantages.shape != (n,) or n % mb or (n // mb) % steps:
        raise ValueError(f"advantages {tuple(advantages.shape)} must have one value per trajectory ({n}), "
                         f"micro_batch {mb} must divide {n}, and grpo_optimizer_steps {steps} the {n // mb} micro-batches")
    num_micro = n // mb
    per_step = num_micro // steps
    adv_all = advantages.to(torch.float64) * tcfg.adv_clip_max
    sig = grid.to(xs.device, torch.float32)
    sums: dict[str, float] = defaultdict(float)
    step_loss, grad_norm, skipped = 0.0, 0.0, 0.0
    optimizer.zero_grad(set_to_none=True)
    order = [j for part in range(steps) for j in range(part, num_micro, steps)]
    for i, (_, idx, _) in enumerate(micro_batches(n, mb, rng, xs.device, order)):  # i: position; part i // per_step
        b, k = mask[idx].nonzero(as_tuple=True)
        rows = idx[b]
        x, x_next = xs[rows, k], xs[rows, k + 1]
        sigma, sigma_next = sig[k], sig[k + 1]
        velocity = GuidedVelocity(policy, cond[rows], scfg.guidance_scale, null_cond)
        mean_ref = std = None
        if tcfg.grpo_beta > 0:
            with torch.no_grad():
                r, r_uncond = velocity(x, sigma, adapter=None)
                mean_ref = sde_step(x, r, sigma, sigma_next, noise_level=scfg.noise_level, kind=scfg.sampler,
                                    v_uncond=r_uncond, guidance_scale=scfg.guidance_scale, x_next=x_next).mean
            std = kl_std(scfg.sampler, sigma, sigma_next, scfg.noise_level)
        with accumulate(policy, last=(i + 1) % per_step == 0):
            v, v_uncond = velocity(x, sigma)
            v_uncond = None if v_uncond is None else v_uncond.detach()  # official: no gradient through uncond
            step = sde_step(x, v, sigma, sigma_next, noise_level=scfg.noise_level, kind=scfg.sampler, v_uncond=v_uncond,
                            guidance_scale=scfg.guidance_scale, x_next=x_next, return_log_prob=True)
            out = flow_grpo_loss(step.log_prob, old_lp[rows, k], adv_all[rows], clip_range=tcfg.grpo_clip_range,
                                 beta=tcfg.grpo_beta, mean=step.mean, mean_ref=mean_ref, std=std)
            (out.loss / per_step).backward()
        step_loss += out.loss.item() / per_step
        values = (out.loss, out.policy_loss, out.kl, out.clipfrac, out.approx_kl, step.log_prob.mean())
        for key, value in zip(LOSS_KEYS, values):
            sums[key] += value.item() / num_micro
        if i < per_step:
            sums["clipfrac_first"] += out.clipfrac.item() / per_step
        else:
            sums["clipfrac_later"] += out.clipfrac.item() / (num_micro - per_step)
        if (i + 1) % per_step == 0:
            norm, bad = finish_step(optimizer, params, tcfg.max_grad_norm, step_loss)
            grad_norm, skipped, step_loss = grad_norm + norm / steps, skipped + bad, 0.0
    return UpdateResult({"clipfrac_later": 0.0, **sums}, grad_norm, skipped)
