"""One DiffusionNFT optimizer step over a rollout's clean latents (`awm_fast.algo.nft.nft_loss`).

Rows are (slot, sample) pairs, slot-major (row = j B + b): sample b trains on K = int(N nft_timestep_fraction)
of the rollout timesteps sigma_0 = 1 .. sigma_{N-1} (t = 0 excluded), the first K of its own random permutation
(`awm_fast.algo.nft.nft_timestep_indices`; official 0.99: 9 of 10), each row with fresh eps:
x_t = (1 - t) x0 + t eps. The same rows go to the policy ("default" adapter, with grad), the "old" policy (the
"ema" adapter slot, which the trainer moves with d = min(nft_decay_rate step, nft_decay_cap) and which also
sampled the rollout) and, when nft_kl_beta > 0, the reference (adapters disabled). Gradients of all micro-batches are averaged into one AdamW step.
Random numbers and DDP as in awm_update: micro-batch i's noise comes from `MicroBatchRNG.micro(i)`.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from awm_fast.algo.nft import nft_loss, nft_timestep_indices
from awm_fast.config import SampleConfig, TrainConfig
from awm_fast.models.lora import EMA
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.train.update_parts import MicroBatchRNG, UpdateResult, accumulate, finish_step, micro_batches

OLD = EMA  # the "old" policy of DiffusionNFT lives in the "ema" adapter slot


def nft_rows(x0: torch.Tensor, times: torch.Tensor, fraction: float, generator: torch.Generator):
    """Training rows of B clean latents: (x_t, x0, t), each (K B, ...), row j B + b at t = times[idx[b, j]] with
    idx = nft_timestep_indices(B, len(times), fraction) and fresh eps per row (drawn after idx, same generator)."""
    batch = x0.shape[0]
    idx = nft_timestep_indices(batch, times.numel(), fraction, generator).to(times.device)
    t = times[idx.T.reshape(-1)]
    x0r = x0.repeat(idx.shape[1], *([1] * (x0.dim() - 1)))
    eps = torch.randn(x0r.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    tv = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tv) * x0r + tv * eps, x0r, t


def nft_update(policy: FlowPolicy, latents: torch.Tensor, cond: Conditioning, advantages: torch.Tensor,
               grid: torch.Tensor, tcfg: TrainConfig, scfg: SampleConfig, rng: MicroBatchRNG,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> UpdateResult:
    """latents: (n, ...) clean x0; advantages: (n,) in [-1, 1]. Returns mean loss parts and grad stats."""
    n, mb = latents.shape[0], tcfg.micro_batch
    if advantages.shape != (n,) or n % mb:
        raise ValueError(f"advantages {tuple(advantages.shape)} must have one value per latent ({n}), "
                         f"and micro_batch {mb} must divide {n}")
    num_micro = n // mb
    times = grid[:-1].to(latents.device, torch.float32)
    sums: dict[str, float] = defaultdict(float)
    optimizer.zero_grad(set_to_none=True)
    for i, idx, g in micro_batches(n, mb, rng, latents.device):
        x_t, x0, t = nft_rows(latents[idx], times, tcfg.nft_timestep_fraction, g)
        T = x0.shape[0] // mb
        c = cond[idx].repeat(T)
        with torch.no_grad():
            v_old = policy.velocity(x_t, t, c, OLD).float()
            v_ref = policy.velocity(x_t, t, c, None).float() if tcfg.nft_kl_beta > 0 else None
        with accumulate(policy, last=i == num_micro - 1):
            v = policy.velocity(x_t, t, c).float()
            out = nft_loss(v, v_old, x_t, x0, t, advantages[idx].repeat(T), nft_beta=tcfg.nft_beta,
                           kl_beta=tcfg.nft_kl_beta, v_ref=v_ref, clip_max=tcfg.adv_clip_max)
            (out.loss / num_micro).backward()
        for key, value in (("loss", out.loss.item()), ("policy_loss", out.policy_loss.item()), ("kl", out.kl.item()),
                           ("positive_loss", out.positive_loss.item()), ("negative_loss", out.negative_loss.item())):
            sums[key] += value / num_micro
    grad_norm, skipped = finish_step(optimizer, params, tcfg.max_grad_norm, sums["loss"])
    return UpdateResult(dict(sums), grad_norm, float(skipped))
