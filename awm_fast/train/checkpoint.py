"""Checkpoints: both LoRA adapters in diffusers/peft format + the full training state, written atomically.

Layout of `<run>/checkpoints/step_000050/`:
    default/pytorch_lora_weights.safetensors, ema/pytorch_lora_weights.safetensors
        pipeline LoRA format (keys "transformer.<module>.lora_A.weight", adapter config in the metadata):
        `StableDiffusion3Pipeline` / `FluxPipeline.load_lora_weights(".../default")` loads it as trained
    (train.finetune=full: default/ and ema/ hold the whole transformer instead, diffusion_pytorch_model.safetensors
    + config.json: `SD3Transformer2DModel.from_pretrained(".../default")` loads the trained weights)
    config.yaml: the run's resolved config at that step (what `awm-fast train --resume` continues with)
    state.pt: optimizer, evaluation EMA, every rank's RNG states, sampler position (seed, step, world size),
        step, metrics history, evaluations
A checkpoint is written to a temporary folder and renamed into place, so a run killed while writing leaves
the previous checkpoints intact (and a `.tmp_*` folder that the next save removes); older ones beyond `keep`
are renamed to `.trash_*` before being deleted, so a half-deleted folder is never taken for a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from awm_fast.models.finetune import load_adapters
from awm_fast.models.lora import EMA, POLICY
from awm_fast.train.faults import run_event

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(run_dir: Path, step: int, transformer, state: dict, keep: int, weights: dict | None = None) -> Path:
    """weights (full fine-tuning): {"default": state dict, "ema": state dict} saved instead of the adapters."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:06d}"
    for stale in folder.glob(".t*_step_*"):  # left by a run killed while writing or deleting
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp_step_{step:06d}_{os.getpid()}"
    for name in (POLICY, EMA):
        if weights is None:
            save_lora(transformer, name, tmp / name)
        else:
            save_model(transformer, weights[name], tmp / name)
    run_event("checkpoint", step)  # a SIGKILL here must leave the earlier checkpoints usable
    torch.save({**state, "step": step}, tmp / "state.pt")
    if isinstance(state.get("config"), dict):  # the config it was trained with, readable (`--resume` takes it)
        import yaml

        (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    _remove(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    if path.exists():
        trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_model(transformer, state_dict: dict, folder: Path) -> None:
    """Whole weights in the diffusers model layout (the config of `transformer`, a diffusers model)."""
    from awm_fast.models.full_finetune import WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / WEIGHTS))
    if hasattr(transformer, "to_json_string"):
        config = json.loads(transformer.to_json_string())
        config["_class_name"] = config["_class_name"].removeprefix("FSDP")  # the class FSDP2 made of it
        (folder / "config.json").write_text(json.dumps(config, indent=2))


def save_lora(transformer, adapter: str, folder: Path) -> None:
    """One adapter in the diffusers pipeline LoRA format of its model family (awm_fast.families: LORA_LOADER)."""
    import diffusers.loaders
    from peft.utils import get_peft_model_state_dict

    from awm_fast.families import family_of_transformer

    mixin = getattr(diffusers.loaders, family_of_transformer(transformer).LORA_LOADER)
    layers = get_peft_model_state_dict(transformer, adapter_name=adapter)
    mixin.save_lora_weights(folder, transformer_lora_layers=layers,
                               transformer_lora_adapter_metadata=transformer.peft_config[adapter].to_dict())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/checkpoints/step_NNNNNN/state.pt)")
    return found[-1]


def load_checkpoint(ckpt: Path, transformer) -> dict:
    """Copy both adapters' weights into the transformer (models.finetune.load_adapters); return the saved
    training state."""
    load_adapters(ckpt, transformer)
    return torch.load(ckpt / "state.pt", weights_only=False)
