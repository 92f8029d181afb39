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
A checkpoint is written to a temporary folder, fsync'ed (every file, then the folders) and renamed into place,
the checkpoints folder fsync'ed after (as PyTorch DCP publishes), so a run killed or a machine lost while
writing leaves the previous checkpoints intact (and a `.tmp_*` folder that the next save removes); older ones
beyond `keep` are renamed to `.trash_*` before being deleted, so a half-deleted folder is never taken for a
checkpoint. A full disk (ENOSPC) is one DiskFull line saying what to do. state.pt holds tensors and plain
containers only and is read with weights_only=True (awm_fast/state_file.py); a run folder's newest checkpoint
that cannot be read is skipped for the newest readable one, with a warning naming both.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from awm_fast.models.finetune import load_adapters
from awm_fast.models.lora import EMA, POLICY
from awm_fast.state_file import (DISK_FULL, STATE_FILE, CheckpointError, DiskFull, disk_full, fsync_dir, fsync_tree,
                                 load_state, save_state)
from awm_fast.train.faults import run_event

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(run_dir: Path, step: int, transformer, state: dict, keep: int, weights: dict | None = None) -> Path:
    """weights (full fine-tuning): {"default": state dict, "ema": state dict} saved instead of the adapters.
    `state` may hold tensors and plain containers (numpy arrays, paths, dataclasses are converted:
    state_file.to_plain); a full disk raises DiskFull (an OSError) saying what to do."""
    folder = Path(run_dir) / "checkpoints"
    try:
        return _save(folder, step, transformer, state, keep, weights)
    except OSError as exc:
        if exc.errno in DISK_FULL and not isinstance(exc, DiskFull):
            raise disk_full(exc, f"checkpoint step_{step:06d}", folder) from None
        raise


def _save(folder: Path, step: int, transformer, state: dict, keep: int, weights: dict | None) -> Path:
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
    save_state({**state, "step": step}, tmp / STATE_FILE)
    if isinstance(state.get("config"), dict):  # the config it was trained with, readable (`--resume` takes it)
        import yaml

        (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    fsync_tree(tmp)  # the files' contents are on disk before the rename publishes them
    _remove(final)
    os.replace(tmp, final)
    fsync_dir(folder)  # ... and the rename itself
    for old in list_checkpoints(folder.parent)[:-keep]:
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
    """A checkpoint folder (itself), or a run folder: its newest readable checkpoint (`check_readable`); a newer
    one that cannot be read is skipped with a warning naming it and the one taken instead."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/checkpoints/step_NNNNNN/state.pt)")
    first_error = None
    for ckpt in reversed(found):
        try:
            check_readable(ckpt)
        except CheckpointError as exc:
            first_error = first_error or exc
            continue
        if first_error is not None:
            logger.warning(f"[warn] the newest checkpoint of {path} cannot be read ({first_error}); falling back to "
                           f"the newest readable one, {ckpt}")
        return ckpt
    raise CheckpointError(f"no readable checkpoint in {path}: {first_error}")


def check_readable(ckpt: Path) -> None:
    """CheckpointError unless `ckpt`'s state.pt loads (weights_only, tensors not read) and every weights file's
    header is whole (safetensors checks that the data covers the file)."""
    from safetensors import safe_open

    load_state(Path(ckpt) / STATE_FILE, mmap=True)
    for file in sorted(Path(ckpt).glob("*/*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type: truncated, garbage
            raise CheckpointError(f"checkpoint weights {file} are unreadable ({str(exc).splitlines()[0]}); resume "
                                  "from an earlier checkpoint (--resume RUN/checkpoints/step_NNNNNN) or start a new "
                                  "run") from None


def load_checkpoint(ckpt: Path, transformer) -> dict:
    """Copy both adapters' weights into the transformer (models.finetune.load_adapters); return the saved
    training state (read with weights_only=True: state_file.load_state)."""
    load_adapters(ckpt, transformer)
    return load_state(Path(ckpt) / STATE_FILE)
