"""Full fine-tuning (train.finetune=full): FSDP2 sharding, the EMA copy's move, checkpoint state.

The policy holds three transformers (models.adapt.make_full_models; its strategy: models.finetune.Full): the trained one (float32 master weights),
the frozen reference and the frozen EMA copy (model.dtype). Under torchrun all three are sharded with FSDP2
(`fully_shard` on each transformer block, then on the root) over one mesh of all ranks: every rank keeps
1/N of every weight, and each call all-gathers a block's weights just before it runs. The three share the
layout (same shapes, same mesh), so the EMA move is local, shard by shard, with no communication. The
optimizer holds the trained model's shards; gradients are reduce-scattered (averaged over ranks) after each
micro-batch's backward, and each rank divides its loss by its own micro-batch count, as under DDP: the step's
gradient is the mean over all micro-batches of all ranks, the 1-process gradient. Every rank makes the same
transformer calls in the same order (equal shares; evaluation pads with dummy batches), since each call
gathers from all ranks.

    ema <- d ema + (1 - d) theta,   d = min(cap, rate * step)   (after each optimizer step)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from awm_fast.models.compile import transformer_blocks
from awm_fast.models.lora import EMA, POLICY

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only
WEIGHTS = "diffusion_pytorch_model.safetensors"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) parameter, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_full_models(policy, d):
    """fully_shard every block, then the root, of the trained, reference and EMA transformers (in place);
    returns the policy (the same object: FSDP2 changes the modules' classes, not their identity)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    with d.guard("sharding the transformers (FSDP2)"):
        for module in policy.models.values():
            for block in transformer_blocks(module):
                fully_shard(block, mesh=mesh)
            fully_shard(module, mesh=mesh, reshard_after_forward=True)  # also the root: sharded between calls
    return policy


@torch.no_grad()
def update_ema_model(ema: torch.nn.Module, trained: torch.nn.Module, step: int, *, rate: float, cap: float) -> float:
    """ema <- d ema + (1 - d) theta with d = min(cap, rate * step), parameter by parameter (shard by shard
    under FSDP2); returns d. The same rule as models.lora.update_ema_adapter."""
    decay = min(cap, rate * step)
    theta = dict(trained.named_parameters())
    for name, p in ema.named_parameters():
        local(p).mul_(decay).add_(local(theta[name]).to(p.dtype), alpha=1 - decay)
    return decay


def full_state(policy, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """({"default": trained state dict, "ema": EMA state dict}, optimizer state dict), whole tensors on CPU.
    A collective under FSDP2: every rank calls it; only rank 0 gets the tensors (the others empty dicts)."""
    trained = policy.models[POLICY]
    weights = {POLICY: get_model_state_dict(trained, options=FULL),
               EMA: get_model_state_dict(policy.models[EMA], options=FULL)}
    return weights, get_optimizer_state_dict(trained, optimizer, options=FULL)


def load_full_state(ckpt: Path, policy, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Every rank reads the whole weights of `ckpt` and keeps its shards (or all of them on one process)."""
    options = StateDictOptions(full_state_dict=True)
    for name in (POLICY, EMA):
        path = Path(ckpt) / name / WEIGHTS
        if not path.is_file():
            raise ValueError(f"checkpoint {ckpt} has no {name}/{WEIGHTS}: not a train.finetune=full checkpoint")
        set_model_state_dict(policy.models[name], load_file(str(path)), options=options)
    set_optimizer_state_dict(policy.models[POLICY], optimizer, optimizer_state, options=options)


def full_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """Whole gradients (gathered from every rank under FSDP2: a collective), on CPU."""
    return [None if p.grad is None else (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
            .detach().cpu().clone() for p in params]
