"""torch.distributed for the trainer: the process group from torchrun's environment, collectives with a
timeout and a clear error, DDP of the LoRA transformer (FSDP2 for full fine-tuning: models/full_finetune.py).

    torchrun --nproc_per_node 8 -m awm_fast.cli train --config geneval_sd35m ...     (one process per GPU)

Without torchrun's variables (or with WORLD_SIZE=1) everything here is a no-op and the trainer runs as one
process. Every collective (and DDP's gradient all-reduce) fails after `run.dist_timeout_s` instead of
hanging when another rank died or stopped; the error names the rank and says so (`CollectiveError`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


COMM_WORDS = ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "timed out", "Timed out",
              "ProcessGroup", "Socket", "socket")


class TrainingError(RuntimeError):
    """A run that cannot go on, reported as one line (the CLI prints it and exits with code 1)."""


class CollectiveError(TrainingError):
    """A collective failed or timed out: another rank died, hangs or was stopped."""


@dataclasses.dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank (GPU index on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 1800.0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def guard(self, what: str, any_error: bool = True):
        """Turn a failed or timed-out collective into a CollectiveError naming this rank. any_error=False (a
        block that does more than communicate): only errors that look like communication failures."""
        try:
            yield
        except CollectiveError:
            raise
        except RuntimeError as exc:  # DistBackendError, gloo/NCCL timeouts and closed connections
            if not self.enabled or isinstance(exc, torch.OutOfMemoryError):
                raise
            # NCCL and the store raise typed errors (DistBackendError, DistNetworkError, DistStoreError: DistError).
            # gloo's timeouts and closed connections arrive as a bare RuntimeError (torch 2.13: "[...gloo/transport/
            # tcp/pair.cc] Connection closed by peer", "Timed out waiting 3000ms for recv"), so for that exact class
            # only its message can tell; a RuntimeError subclass (TrainingError, a library's own) is never read.
            if not any_error and not (isinstance(exc, dist.DistError) or (
                    type(exc) is RuntimeError and any(word in str(exc) for word in COMM_WORDS))):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CollectiveError(
                f"rank {self.rank}/{self.world}: {what} failed or timed out (run.dist_timeout_s={self.timeout_s:g}); "
                f"another rank probably died or hangs, see its output ({type(exc).__name__}: {first[:300]})") from exc

    # -- collectives (each a no-op on one process) ------------------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """NCCL moves CUDA tensors only; gloo CPU ones."""
        return t.to(self.device) if dist.get_backend() == "nccl" else t.cpu()

    def all_gather_cat(self, t: torch.Tensor, what: str = "gathering rollout rewards") -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order (same device and dtype as t)."""
        if not self.enabled:
            return t
        local = self._comm(t.contiguous())
        parts = [torch.empty_like(local) for _ in range(self.world)]
        with self.guard(what):
            dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def mean(self, values: dict[str, float], what: str = "averaging step metrics") -> dict[str, float]:
        """Average floats over ranks (each rank holds the mean of an equal share)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        t = self._comm(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        with self.guard(what):
            dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.cpu().tolist())}

    def any(self, flag: bool, what: str = "agreeing on a skipped step") -> bool:
        if not self.enabled:
            return bool(flag)
        t = self._comm(torch.tensor([float(bool(flag))]))
        with self.guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj, what: str = "gathering objects") -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        with self.guard(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, what: str = "broadcasting from rank 0"):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        with self.guard(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.enabled:
            self.any(False, what)

    @contextlib.contextmanager
    def main_first(self, what: str = "waiting for rank 0 to prepare shared files"):
        """Rank 0 runs the block first (e.g. builds caches on disk), then the others."""
        if not self.is_main:
            self.barrier(what)
        yield
        if self.is_main:
            self.barrier(what)


_CURRENT = Dist()


def current() -> Dist:
    """The Dist of this process (set by `init_distributed`)."""
    return _CURRENT


def init_distributed(device_name: str = "auto", backend: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); one process without it. The device is cuda:LOCAL_RANK on GPU nodes."""
    global _CURRENT
    from awm_fast.env import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if world > 1 and local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs "
                             "(--nproc_per_node must not exceed the GPUs per node)")
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world <= 1:
        _CURRENT = Dist(device=device, timeout_s=timeout_s)
        return _CURRENT
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"run.dist_backend=nccl needs CUDA devices, but run.device resolves to {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                    timeout_s=timeout_s)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group, once this process's DDP wrappers are unreachable (the trainer's frames gone).

    The group's last reference is dropped here, from Python, whose binding releases the GIL while the group's
    C++ destructor joins its Gloo worker threads. Left to a DDP reducer, that destructor would run inside the
    reducer's deallocation with the GIL held, and a worker still releasing a finished collective's tensors waits
    for the GIL: the process hangs until killed (pytorch issue 56297; seen after a clean stop on a loaded
    machine). So: hold the group, collect the wrappers' reference cycles, destroy, then drop the group."""
    global _CURRENT
    if dist.is_initialized():
        world = dist.group.WORLD
        gc.collect()  # DDP wrappers in reference cycles go now, while `world` keeps the group alive
        dist.destroy_process_group()
        del world  # the last reference: the destructor runs here, without the GIL
    _CURRENT = Dist()


class _DDP(DistributedDataParallel):
    """DDP whose unknown attributes fall through to the wrapped transformer (`.config`, `.peft_config`)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_for_training(policy, d: Dist):
    """The policy whose transformer is DDP-wrapped (same parameters) for the update's forward/backward calls;
    the unwrapped policy stays in use for rollouts, evaluation, EMAs and checkpoints. On one process: `policy`.
    Full fine-tuning: the trained, reference and EMA transformers sharded in place with FSDP2
    (models.full_finetune.shard_full_models); the returned policy is `policy` itself. policy.finetune decides."""
    if not d.enabled:
        return policy
    return policy.finetune.distribute(policy, d, lambda p: _lora_ddp(p, d))


def _lora_ddp(policy, d: Dist):
    """Only the trainable LoRA parameters are bucketed and all-reduced; the frozen base weights (identical on every
    rank: they are loaded from the same files) are not broadcast, the LoRA adapters are, from rank 0."""
    module = policy.transformer
    frozen = [n for n, _ in module.named_parameters() if "lora_" not in n] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    with d.guard("wrapping the transformer in DDP (broadcast of the LoRA weights)"):
        ddp = _DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return dataclasses.replace(policy, transformer=ddp)
