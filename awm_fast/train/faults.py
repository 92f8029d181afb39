"""Failures the trainer turns into one clear line instead of a crash dump or a hang.

- a reward that raises (a flaky server, a network file system) is retried `reward.retries` times, then the run
  stops naming the reward and the last error (ValueError/TypeError are bugs or bad input: never retried);
- `train.max_nonfinite_steps` steps in a row with a non-finite loss or gradient stop the run (each one alone
  is skipped with a warning: algorithms.update_loop.finish_step);
- CUDA out-of-memory stops with the config keys that reduce memory;
- `run_event`: named points of a run (EVENT_HOOKS) where observers, e.g. a test that SIGKILLs there, hook in.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from awm_fast.train.distributed import TrainingError

logger = logging.getLogger(__name__)


class RewardFailed(TrainingError):
    pass


class NonFiniteSteps(TrainingError):
    pass


class OutOfMemory(TrainingError):
    pass


class RetryingReward:
    """Calls `reward`, retrying up to `retries` times (waiting `wait_s`, doubling) on errors other than
    ValueError/TypeError/out-of-memory; then raises RewardFailed."""

    def __init__(self, reward, retries: int = 2, wait_s: float = 5.0) -> None:
        self.reward, self.retries, self.wait_s = reward, retries, wait_s
        self.name = getattr(reward, "name", type(reward).__name__)

    def __call__(self, images, prompts, metadata):
        wait = self.wait_s
        for attempt in range(self.retries + 1):
            try:
                return self.reward(images, prompts, metadata)
            except (ValueError, TypeError, torch.OutOfMemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - anything else may be transient (network, server, files)
                last = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                if attempt == self.retries:
                    raise RewardFailed(f"reward {self.name!r} failed {self.retries + 1} times in a row, last error "
                                       f"{last[:300]}; check the reward model/server (reward.retries="
                                       f"{self.retries} retries)") from exc
                logger.warning(f"[warn] reward {self.name!r} failed ({last[:200]}); retry {attempt + 1}/{self.retries} "
                               f"in {wait:g} s")
                time.sleep(wait)
                wait *= 2

    def __getattr__(self, name):  # the wrapped reward's other attributes (only called for missing ones)
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)


MEMORY_KNOBS = ("train.micro_batch (fewer rows per backward)", "sample.batch_size (fewer images per rollout batch)",
                "train.gradient_checkpointing=true", "model.dtype=bfloat16", "train.num_timesteps (rows = micro_batch x num_timesteps)",
                "model.resolution")


def out_of_memory(phase: str, exc: BaseException, device: torch.device) -> OutOfMemory:
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    return OutOfMemory(f"out of memory on {device} during {phase}{peak}; reduce memory with: "
                       + "; ".join(MEMORY_KNOBS) + f" ({str(exc).strip().splitlines()[0][:200] if str(exc) else ''})")


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; raises after `limit` in a row (0: never)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def update(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning(f"[warn] step {step}: non-finite loss or gradient, optimizer step skipped "
                       f"({self.in_a_row} in a row{f', stopping at {self.limit}' if self.limit else ''})")
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteSteps(f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                                 f"gradient (train.max_nonfinite_steps={self.limit}); lower train.lr, check the "
                                 "reward and the model dtype, or resume from the last checkpoint")


EVENT_HOOKS: list[Callable[[str, int], None]] = []  # hook(event, step): "update" (a step's update and EMA
# done, before its bookkeeping), "checkpoint" (a checkpoint's files written, before it is published). Empty by
# default; e.g. tests/train/hooked_cli.py parks a process there for a SIGKILL.


def run_event(name: str, step: int) -> None:
    """Call every EVENT_HOOKS entry with (name, step)."""
    for hook in EVENT_HOOKS:
        hook(name, step)
