"""One algorithm update on given rows, outside the trainer: the shared test path into algorithms.*.update."""
from __future__ import annotations

import torch

from awm_fast.algorithms import get_algorithm
from awm_fast.algorithms.base import Rollout, UpdateContext
from awm_fast.algorithms.update_loop import MicroBatchRNG, UpdateResult
from awm_fast.config import Config


def update_on(cfg: Config, policy, latents: torch.Tensor, cond, advantages: torch.Tensor, grid: torch.Tensor,
              rng: MicroBatchRNG, optimizer: torch.optim.Optimizer, params: list, *, kept=None,
              null_cond=None) -> UpdateResult:
    """cfg.train.algorithm's update on a one-rank rollout of `latents` (rewards and groups unused by updates)."""
    n = latents.shape[0]
    roll = Rollout(latents, cond, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long), slice(0, n),
                   kept=kept)
    return get_algorithm(cfg).update(UpdateContext(policy, grid, rng, optimizer, params, null_cond), roll, advantages)
