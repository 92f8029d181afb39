"""Reward checkpoints that are one file (HPSv2.1's .pt, ImageReward's .pt): find the file, load its tensors without
running code, and copy them (keys renamed by the reward) into a transformers model in full.

A file is given as a local path or "REPO_ID:FILENAME" on the hub (hf_hub_download; the local cache only when
HF_HUB_OFFLINE=1). `.pt`/`.pth`/`.bin` load with torch.load(weights_only=True) (tensors and plain containers: nothing
in the file runs), `.safetensors` with safetensors; a {"state_dict": {...}} wrapper is unwrapped.
"""
from __future__ import annotations

from pathlib import Path
import torch

from awm_fast.env import hub_offline


def resolve_file(spec: str, *, reward: str, what: str, option: str) -> Path:
    """A local file, or "REPO_ID:FILENAME" fetched through the hub cache; FileNotFoundError in one line otherwise."""
    hint = f"download it on a machine with network and pass {option}=PATH (a local file) or {option}=REPO_ID:FILENAME"
    if not isinstance(spec, str) or not spec:
        raise FileNotFoundError(f"reward {reward!r}: no {what} given; {hint}")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if ":" in spec and not path.exists() and spec.count(":") == 1 and not spec.startswith(("/", ".", "~")):
        from huggingface_hub import hf_hub_download

        repo, filename = spec.split(":")
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=hub_offline()))
        except Exception as exc:  # offline, 404, auth: hub errors come in many classes, all mean "not available"
            raise FileNotFoundError(f"reward {reward!r}: cannot fetch the {what} {spec!r} ({type(exc).__name__}); "
                                    f"{hint}") from None
    raise FileNotFoundError(f"reward {reward!r}: the {what} {spec!r} does not exist; {hint}")


def load_state_dict(path: Path, *, reward: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (module docstring); ValueError in one line for a file that needs code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for a file that would run code, or a corrupt file
            raise ValueError(f"reward {reward!r}: {path} does not load as plain tensors (torch.load weights_only="
                             f"True: {' '.join(str(exc).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"reward {reward!r}: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved files prefix every key


def load_exact(module: torch.nn.Module, mapped: dict[str, torch.Tensor], *, reward: str, source: Path) -> None:
    """module.load_state_dict(mapped) in full (keys already renamed to the module's): a parameter or persistent
    buffer left unfilled, a key with no home or a shape that does not fit is a ValueError naming it."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise ValueError(f"reward {reward!r}: {source} does not fit the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}; {len(missing)} missing, {len(unexpected)} unexpected)")
    try:
        module.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"reward {reward!r}: {source} does not fit the model "
                         f"({' '.join(str(exc).split())[:240]})") from None
