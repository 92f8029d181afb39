"""The contract of an RL algorithm (awm_fast.algorithms.awm, .flow_grpo, .nft) and the typed values that travel
through the trainer's step:

    sample(policy, cond, grid, generator, null_cond) -> Sampled        one rollout batch
    Rollout                                                            the step's rollout, rewards gathered
    update(UpdateContext, Rollout, advantages) -> UpdateResult         the optimizer step(s) on it
    adapter_decay() -> (rate, cap)                                     how the "ema" adapter moves after a step:
                                                                       ema <- d ema + (1 - d) theta, d = min(cap, rate step)
    decay_step(step) -> int                                            the step that d is computed at (default: step)

An algorithm is built from the whole Config (its own section and the shared train / sample keys) and keeps it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from awm_fast.algorithms.update_loop import MicroBatchRNG, UpdateResult

if TYPE_CHECKING:
    from awm_fast.config import Config
    from awm_fast.models.policy import Conditioning, FlowPolicy


class KeptPerSample(Protocol):
    """What a sampler keeps per sample for its update (Flow-GRPO's trajectory): (B, ...) tensors, batched by `cat`."""

    @classmethod
    def cat(cls, items: list) -> "KeptPerSample": ...


@dataclass
class Sampled:
    """One rollout batch: the clean samples x0 (B, ...) and what the sampler kept for the update (or None)."""

    latents: torch.Tensor
    kept: KeptPerSample | None = None


@dataclass
class Rollout:
    """One step's rollout as the update sees it. Local to this rank: latents (n_local, ...) the clean samples,
    cond their conditioning, kept what the algorithm's sampler kept per sample (None for AWM / NFT). Gathered
    over all ranks (global order): rewards (n,) float64, groups (n,) prompt-group ids; `local` = this rank's
    slice of them. reward_parts: the mean of each reward part (combined rewards). Seconds: sampling, scoring
    (summed over the reward threads), waiting for the last scores."""

    latents: torch.Tensor
    cond: Conditioning
    rewards: torch.Tensor
    groups: torch.Tensor
    local: slice
    reward_parts: dict[str, float] = field(default_factory=dict)
    kept: KeptPerSample | None = None
    sample_s: float = 0.0
    reward_s: float = 0.0
    reward_wait_s: float = 0.0

    @staticmethod
    def merge(batches: list[Sampled]) -> tuple[torch.Tensor, KeptPerSample | None]:
        """(latents, kept) of the step from its rollout batches, concatenated along the batch."""
        latents = torch.cat([b.latents for b in batches])
        kept = [b.kept for b in batches if b.kept is not None]
        return latents, (type(kept[0]).cat(kept) if kept else None)


@dataclass
class UpdateContext:
    """What an update needs besides the rollout: the policy (its transformer DDP/FSDP-wrapped under torchrun),
    the rollout's time grid, the step's random numbers, the optimizer and its parameters, the empty-prompt
    conditioning (CFG) and `agree(flag) -> bool`: True when the flag is set on any rank (skipped steps)."""

    policy: FlowPolicy
    grid: torch.Tensor
    rng: MicroBatchRNG
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    null_cond: Conditioning | None = None
    agree: Callable[[bool], bool] = bool  # train.distributed.Dist.any under torchrun


class Algorithm(ABC):
    """One RL algorithm: how it samples, how it updates, how its "ema" adapter moves (see the module docstring);
    its train.algorithm name is its key in algorithms.ALGORITHMS."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abstractmethod
    def sample(self, policy: FlowPolicy, cond: Conditioning, grid: torch.Tensor, generator: torch.Generator,
               null_cond: Conditioning | None) -> Sampled: ...

    @abstractmethod
    def update(self, ctx: UpdateContext, roll: Rollout, advantages: torch.Tensor) -> UpdateResult: ...

    def adapter_decay(self) -> tuple[float, float]:
        """(rate, cap) of the "ema" adapter: train.ema_decay_rate / ema_decay_cap unless the algorithm says."""
        return self.cfg.train.ema_decay_rate, self.cfg.train.ema_decay_cap

    def decay_step(self, step: int) -> int:
        """The step the "ema" adapter's decay is computed at after optimizer step `step` (1-based)."""
        return step
