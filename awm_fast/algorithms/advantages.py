"""Per-prompt group advantages with the global std (the official AWM / Flow-GRPO recipe).

    A = (r - mean_{group of r's prompt}(r)) / (std over ALL rewards of the step + 1e-4)
    A = clip(A, -clip_max, clip_max) / clip_max
A group whose rewards are all equal gets exactly 0 (its mean, a rounded sum / count, may differ from them in the
last bit): Flow-GRPO drops the zero-advantage samples (algorithms.flow_grpo.informative_samples).
"""
from __future__ import annotations

import torch

STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, clip_max: float = 5.0) -> torch.Tensor:
    """rewards, group_ids: (N,). Returns float64 advantages in [-1, 1].

    Raises ValueError on non-finite rewards or a group with a single member. An all-equal step (global
    std 0) gives all-zero advantages: nothing to learn from, and nothing divided by zero.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-d shapes")
    r = rewards.to(torch.float64)
    bad = ~torch.isfinite(r)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {r.numel()} rewards are NaN or inf (first at index {int(bad.nonzero()[0])})")
    if clip_max <= 0:
        raise ValueError(f"clip_max must be > 0, got {clip_max}")
    uniq, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"group {int(uniq[counts < 2][0])} has a single sample: group advantages need >= 2")
    sums = torch.zeros(len(uniq), dtype=torch.float64, device=r.device).index_add_(0, inverse, r)
    means = sums / counts.to(torch.float64)
    std = r.std(unbiased=False) if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
    lows = torch.full_like(means, torch.inf).scatter_reduce(0, inverse, r, "amin")
    flat = lows == torch.full_like(means, -torch.inf).scatter_reduce(0, inverse, r, "amax")
    adv = torch.where(flat[inverse], 0.0, (r - means[inverse]) / (std + STD_EPS))  # exactly 0: sum / count may round
    return adv.clamp(-clip_max, clip_max) / clip_max


def count_flat_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> int:
    """How many groups have all-equal rewards (zero advantages: no learning signal from that prompt)."""
    return sum(int(bool((rewards[group_ids == g] == rewards[group_ids == g][0]).all())) for g in group_ids.unique())
