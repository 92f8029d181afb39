"""Reward interface: images in [0, 1] (B, C, H, W) + prompts + metadata -> {"reward": (B,), other metrics}."""
from __future__ import annotations

from typing import Protocol

import torch


class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        """Must return at least "reward": a float tensor of shape (B,)."""
        ...


def check_reward_output(name: str, out: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """The "reward" entry as float64 (B,); ValueError naming the reward for a bad shape or non-finite values."""
    if "reward" not in out:
        raise ValueError(f"reward {name!r} returned no 'reward' entry (got {sorted(out)})")
    r = torch.as_tensor(out["reward"]).to(torch.float64).reshape(-1)
    if r.numel() != batch:
        raise ValueError(f"reward {name!r} returned {r.numel()} values for {batch} images")
    bad = ~torch.isfinite(r)
    if bad.any():
        raise ValueError(f"reward {name!r} returned {int(bad.sum())} non-finite values (NaN/inf) for {batch} images")
    return r
