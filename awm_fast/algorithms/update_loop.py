"""The update skeleton every algorithm shares: per-micro-batch random numbers, the micro-batch loop with
gradient accumulation under DDP (or FSDP2), the optimizer step with clipping and the non-finite guard, and the
noisy training rows x_t = (1 - t) x0 + t eps.

    run_update(policy, optimizer, params, rng, n, micro_batch, loss_fn, optimizer_steps=S, agree=...)

splits the n local samples into n / micro_batch micro-batches; micro-batch i belongs to optimizer step i mod S
(round robin: with every rank holding a multiple of S micro-batches, each step trains the same global
micro-batches on 1 or N processes). For each micro-batch `loss_fn(rows, gen, part)` returns (loss, parts): the
differentiable scalar and its parts (0-dim tensors, summed on the device: one host sync per optimizer step); the gradient of loss / (micro-batches per step) accumulates
(DDP all-reduces once, on the step's last micro-batch), then the step clips to max_grad_norm and applies
AdamW unless the loss or the gradient is non-finite on any rank. The result averages each part over the
micro-batches that reported it; grad_norm is the mean over the S steps, skipped counts the dropped ones.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch.distributed.tensor import DTensor
from awm_fast.logs import progress_bar

# Observers of each optimizer step's gradients, called as hook(params) after accumulation and before clipping
# (e.g. saving them: tests/train/grad_dump.py). Empty by default.
GRADIENT_HOOKS: list[Callable[[list[torch.nn.Parameter]], None]] = []


def derived_seed(*parts) -> int:
    """A 63-bit seed from (seed, step, what, index, ...): the same on every rank and every world size."""
    digest = hashlib.blake2b(repr(tuple(int(p) if isinstance(p, bool) else p for p in parts)).encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class MicroBatchRNG(torch.Generator):
    """Random numbers of one update, independent of which rank (and how many ranks) trains which rows.

    Itself a generator (seeded by (seed, step, "shuffle", first_index)) for loops that permute their rows;
    `micro(i)` is a fresh generator for the i-th local micro-batch, seeded by (seed, step, global index
    first_index + i): a micro-batch's timesteps and noise are the same whichever rank draws them."""

    def __new__(cls, seed: int, step: int, first_index: int = 0, device: torch.device | str = "cpu"):
        return super().__new__(cls, device=device)

    def __init__(self, seed: int, step: int, first_index: int = 0, device: torch.device | str = "cpu") -> None:
        self.seed, self.step, self.first_index = seed, step, first_index
        self.manual_seed(derived_seed(seed, step, "shuffle", first_index))

    def micro(self, i: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            derived_seed(self.seed, self.step, "train", self.first_index + i))


def micro_batches(n: int, micro_batch: int, rng: MicroBatchRNG, device: torch.device | str,
                  order: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Generator]]:
    """(i, rows, gen) for the n // micro_batch local micro-batches, rows = [i mb, (i + 1) mb) in order (the
    trainer's sampler already shuffled the rollout) or in the given `order` of micro-batch indices,
    gen = rng.micro(i), seeded by the global micro-batch index: the same rows, timesteps and noise on 1 or N
    processes."""
    if not isinstance(rng, MicroBatchRNG):
        raise TypeError(f"the update needs the trainer's MicroBatchRNG(seed, step, first_index), got {type(rng).__name__}")
    for i in progress_bar(range(n // micro_batch) if order is None else order, desc="train", unit="mb",
                          leave=False):
        yield i, torch.arange(i * micro_batch, (i + 1) * micro_batch, device=device), rng.micro(i)


@dataclass
class UpdateResult:
    """What one update returns: `losses`, the loss parts averaged over this rank's micro-batches (the trainer
    averages them over ranks), and the already global grad_norm (mean over the update's optimizer steps) and
    skipped (how many non-finite optimizer steps were dropped; every rank takes the same decision)."""

    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    skipped: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {**self.losses, "grad_norm": self.grad_norm, "skipped": self.skipped}


def accumulate(policy, last: bool):
    """Context for one micro-batch's forward and backward: DDP's `no_sync` except on the last one, so the
    gradient is all-reduced once per optimizer step (a no-op without DDP; FSDP2 reduce-scatters after every
    micro-batch's backward, which keeps only gradient shards between micro-batches)."""
    module = policy.transformer
    if not last and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def noisy_rows(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """Rows for T times over B latents, timestep-major (row = k B + b), fresh eps per row:
    x_t = (1 - t) x0 + t eps. t: (T,) shared by the B samples, or (T, B) per sample, on x0's device (as
    sampling.timesteps draws it: no host-to-device copy, which would synchronise, per micro-batch).
    Returns (x_t, u = eps - x0, t per row)."""
    T, B = t.shape[0], x0.shape[0]
    if t.dim() == 2 and t.shape[1] != B:
        raise ValueError(f"per-sample times of shape {tuple(t.shape)} do not match {B} latents")
    if t.device != x0.device:
        raise ValueError(f"training times on {t.device} for latents on {x0.device}: draw them on the latents' device")
    x0r = x0.repeat(T, *([1] * (x0.dim() - 1)))
    t_rows = t.to(torch.float32).flatten() if t.dim() == 2 else t.to(torch.float32).repeat_interleave(B)
    eps = torch.randn(x0r.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    tv = t_rows.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tv) * x0r + tv * eps, eps - x0r, t_rows


def finish_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                loss: float, agree: Callable[[bool], bool] = bool) -> tuple[float, bool]:
    """Clip, then step unless the loss or the gradient is non-finite on any rank (`agree(flag)`: the flag on
    any rank; NaN never reaches the weights); always leaves the grads cleared. Returns (grad norm, skipped)."""
    for hook in GRADIENT_HOOKS:
        hook(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # of the whole gradient, also when sharded
    grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    bad = agree(not (math.isfinite(grad_norm) and math.isfinite(loss)))
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


LossFn = Callable[[torch.Tensor, torch.Generator, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def run_update(ctx, n: int, micro_batch: int, max_grad_norm: float, loss_fn: LossFn, *,
               optimizer_steps: int = 1, device: torch.device | str = "cpu") -> UpdateResult:
    """The micro-batch loop and optimizer step(s) of an update (module docstring); ctx: an
    algorithms.base.UpdateContext (policy, optimizer, params, rng, agree)."""
    num_micro = n // micro_batch
    if n % micro_batch or num_micro % optimizer_steps:
        raise ValueError(f"micro_batch {micro_batch} must divide the {n} local samples and the optimizer steps "
                         f"({optimizer_steps}) the {num_micro} micro-batches")
    per_step = num_micro // optimizer_steps
    order = [j for part in range(optimizer_steps) for j in range(part, num_micro, optimizer_steps)]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    step_loss, grad_norm, skipped = 0.0, 0.0, 0
    ctx.optimizer.zero_grad(set_to_none=True)
    for pos, (_, rows, gen) in enumerate(micro_batches(n, micro_batch, ctx.rng, device, order)):
        last = (pos + 1) % per_step == 0
        with accumulate(ctx.policy, last=last):
            loss, parts = loss_fn(rows, gen, pos // per_step)
            (loss / per_step).backward()
        step_loss = step_loss + loss.detach().double() / per_step  # on the device: no sync per micro-batch
        for key, value in parts.items():
            sums[key] = sums[key] + value.detach().double() if key in sums else value.detach().double()
            counts[key] += 1
        if last:
            norm, bad = finish_step(ctx.optimizer, ctx.params, max_grad_norm, float(step_loss), ctx.agree)
            grad_norm, skipped, step_loss = grad_norm + norm / optimizer_steps, skipped + bad, 0.0
    return UpdateResult({k: float(v) / counts[k] for k, v in sums.items()}, grad_norm, float(skipped))
