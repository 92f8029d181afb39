"""LoRA or full fine-tuning (train.finetune) as one object, `FlowPolicy.finetune`, chosen once when the policy
is finished (families.load.finish_policy): which parameters train, which module a velocity call uses, how the
KL-anchor EMA moves, what a checkpoint holds and how it is read back, and how several processes share the model.

    lora: the frozen base carries a "default" (trained) and an "ema" LoRA adapter; a call routes the rows of
          its batch to an adapter (models.routing); DDP all-reduces the adapter gradients.
    full: three transformers (models.adapt.make_full_models): trained (float32), frozen reference, frozen EMA;
          the adapter argument picks the module; FSDP2 shards all three (models.full_finetune).

    ema <- d ema + (1 - d) theta,   d = min(cap, rate * step)   (either way, after each optimizer step)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Protocol

import torch

from awm_fast.models.lora import EMA, POLICY, adapter_params, update_ema_adapter
from awm_fast.state_file import STATE_FILE, CheckpointError, load_state


class FlowPolicy(Protocol):
    """What a strategy reads of the policy it serves (models.policy.FlowPolicy, which holds the strategy and so
    imports this module: a Protocol here instead of an import back)."""

    transformer: torch.nn.Module
    models: dict | None


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # one adapter in a checkpoint's default/ or ema/
PREFIX = "transformer."  # the diffusers pipeline LoRA format's key prefix


class Finetune(ABC):
    """What the trainer, evaluation, distribution and the commands ask of the fine-tuning mode."""

    name: str  # the train.finetune value
    lockstep_eval: bool  # under several processes every rank must make the same transformer calls

    @abstractmethod
    def trained_params(self, policy: FlowPolicy) -> list[torch.nn.Parameter]:
        """The parameters the optimizer steps."""

    @abstractmethod
    def module_for(self, policy: FlowPolicy, adapter: str | None) -> torch.nn.Module | None:
        """The module a velocity call with `adapter` runs, or None: the transformer with a routing mask."""

    @abstractmethod
    def update_ema(self, policy: FlowPolicy, step: int, *, rate: float, cap: float) -> float:
        """Move the KL-anchor EMA after optimizer step `step`; returns the decay d used."""

    @abstractmethod
    def distribute(self, policy: FlowPolicy, d, ddp: Callable[[FlowPolicy], FlowPolicy]) -> FlowPolicy:
        """The policy the update's forward/backward calls use on several processes (`ddp`: the trainer's DDP
        wrapper of the LoRA transformer)."""

    @abstractmethod
    def checkpoint_state(self, policy: FlowPolicy, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
        """(whole weights to save instead of the adapters, or None; optimizer state dict). A collective under
        FSDP2: every rank calls it."""

    @abstractmethod
    def load_checkpoint(self, ckpt: Path, policy: FlowPolicy, optimizer: torch.optim.Optimizer) -> dict:
        """Read the trained and EMA weights and the optimizer state of `ckpt`; returns its training state."""

    @abstractmethod
    def load_trained(self, ckpt: Path, policy: FlowPolicy) -> dict:
        """Read the weights the commands use (sample, eval, export) from `ckpt`; returns its training state."""


class Lora(Finetune):
    name, lockstep_eval = "lora", False

    def trained_params(self, policy):
        return list(adapter_params(policy.transformer, POLICY).values())

    def module_for(self, policy, adapter):
        return None

    def update_ema(self, policy, step, *, rate, cap):
        return update_ema_adapter(policy.transformer, step, rate=rate, cap=cap)

    def distribute(self, policy, d, ddp):
        return ddp(policy)

    def checkpoint_state(self, policy, optimizer):
        return None, optimizer.state_dict()

    def load_checkpoint(self, ckpt, policy, optimizer):
        load_adapters(ckpt, policy.transformer)
        state = load_state(Path(ckpt) / STATE_FILE)
        optimizer.load_state_dict(state["optimizer"])
        return state

    def load_trained(self, ckpt, policy):
        load_adapters(ckpt, policy.transformer)
        return load_state(Path(ckpt) / STATE_FILE)


class Full(Finetune):
    name, lockstep_eval = "full", True

    def trained_params(self, policy):
        return list(policy.transformer.parameters())

    def module_for(self, policy, adapter):
        if adapter not in policy.models:
            raise ValueError(f"adapter={adapter!r} is not one of {tuple(policy.models)} (full fine-tuning models)")
        return policy.models[adapter]

    def update_ema(self, policy, step, *, rate, cap):
        from awm_fast.models.full_finetune import update_ema_model

        return update_ema_model(policy.models[EMA], policy.transformer, step, rate=rate, cap=cap)

    def distribute(self, policy, d, ddp):
        from awm_fast.models.full_finetune import shard_full_models

        return shard_full_models(policy, d)

    def checkpoint_state(self, policy, optimizer):
        from awm_fast.models.full_finetune import full_state

        return full_state(policy, optimizer)

    def load_checkpoint(self, ckpt, policy, optimizer):
        from awm_fast.models.full_finetune import load_full_state

        state = load_state(Path(ckpt) / STATE_FILE)
        load_full_state(ckpt, policy, optimizer, state["optimizer"])
        return state

    def load_trained(self, ckpt, policy):
        from awm_fast.models.full_finetune import WEIGHTS

        weights = read_weights(Path(ckpt) / POLICY / WEIGHTS)
        try:
            policy.transformer.load_state_dict(weights)  # default/: the trained one
        except RuntimeError as exc:
            detail = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
            raise CheckpointError(f"checkpoint {ckpt} does not fit this model ({detail}): a checkpoint of another "
                                  "model or size") from None
        return load_state(Path(ckpt) / STATE_FILE)


LORA, FULL = Lora(), Full()
FINETUNES = {f.name: f for f in (LORA, FULL)}  # train.finetune -> its strategy
FINETUNE_MODES = tuple(FINETUNES)  # train.finetune


def get_finetune(name: str) -> Finetune:
    if name not in FINETUNES:
        raise ValueError(f"train.finetune={name!r} is not one of {', '.join(FINETUNES)}")
    return FINETUNES[name]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CheckpointError (one line) when it is truncated or not safetensors."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type: truncated, garbage, missing
        raise CheckpointError(f"checkpoint weights {path} are unreadable ({str(exc).strip().splitlines()[0]}): "
                              "truncated or damaged; use an earlier checkpoint") from None


def load_adapters(ckpt: Path, transformer) -> None:
    """Copy both adapters' weights of a LoRA checkpoint (default/ and ema/, the pipeline LoRA format) into the
    transformer; CheckpointError naming a file that cannot be read, or a shape (another model.lora_rank) that
    differs from the model's."""
    for name in (POLICY, EMA):
        path = Path(ckpt) / name / LORA_WEIGHTS
        if not path.is_file():
            raise ValueError(f"checkpoint {ckpt} has no {name}/{path.name}: not a LoRA checkpoint "
                             "(a train.finetune=full one holds diffusion_pytorch_model.safetensors)")
        weights = {k.removeprefix(PREFIX): v for k, v in read_weights(path).items()}
        params = adapter_params(transformer, name)
        missing = sorted(set(params) - set(weights))
        if missing:
            raise ValueError(f"checkpoint {ckpt} adapter {name!r} lacks {len(missing)} tensors, e.g. {missing[0]}")
        for key, p in params.items():
            if weights[key].shape != p.shape:
                raise CheckpointError(
                    f"checkpoint {ckpt} adapter {name!r} does not fit this model: {key} is "
                    f"{tuple(weights[key].shape)}, the model's {tuple(p.shape)} (a checkpoint of another model.lora_rank "
                    "or model)")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(weights[key])
