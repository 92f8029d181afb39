"""Reward interface and the helpers every reward shares.

A reward is called as ``reward(images, prompts, metadata)`` with
  images:   a float tensor (N, C, H, W) in [0, 1] (C = 1 or 3), or a list of N PIL images,
  prompts:  N strings, metadata: N dicts (per-prompt metadata, e.g. GenEval's {"tag", "include"}),
and returns a dict with "reward": a float tensor (N,) plus optional named sub-scores, each (N,).

Videos (N, F, C, H, W) in [0, 1] (model.kind=wan) go through `score_batch`: an image reward scores every frame,
    reward_i = mean_f r(frame_if)   (each sub-score likewise),   frame_std_i = std_f r(frame_if)   (population std)
unless the reward scores whole clips: a class attribute `takes_video = True` (it then gets the (N, F, C, H, W)
tensor itself).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import contextlib

import torch
from PIL import Image

from awm_fast.env import hub_offline


class Reward(Protocol):
    name: str

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        """Must return at least "reward": a float tensor of shape (N,)."""
        ...


@contextlib.contextmanager
def evaluation_mode(reward):
    """Marks `reward` and every reward it wraps (`.reward`, `.rewards`) as scoring an evaluation for the block:
    `evaluating = True`. A reward that scores differently there reads it (GenEval: only_strict off, as the
    official evaluation)."""
    found, todo = [], [reward]
    while todo:
        r = todo.pop()
        found.append(r)
        todo.extend([x for x in [getattr(r, "reward", None)] if x is not None] + list(getattr(r, "rewards", ())))
    previous = [getattr(r, "evaluating", False) for r in found]
    for r in found:
        try:
            r.evaluating = True
        except AttributeError:  # a plain function or a frozen object: it has nothing to switch
            pass
    try:
        yield
    finally:
        for r, was in zip(found, previous):
            try:
                r.evaluating = was
            except AttributeError:
                pass


def check_reward_output(name: str, out: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """The "reward" entry as float64 (B,); ValueError naming the reward for a bad shape or non-finite values."""
    if "reward" not in out:
        raise ValueError(f"reward {name!r} returned no 'reward' entry (got {sorted(out)})")
    r = torch.as_tensor(out["reward"]).to(torch.float64).reshape(-1)
    if r.numel() != batch:
        raise ValueError(f"reward {name!r} returned {r.numel()} values for {batch} images")
    bad = ~torch.isfinite(r)
    if bad.any():
        raise ValueError(f"reward {name!r} returned {int(bad.sum())} non-finite values (NaN/inf) for {batch} images")
    return r


FRAME_STD = "frame_std"  # the per-video std over frames of a per-frame reward (score_batch)


def is_video(images) -> bool:
    return isinstance(images, torch.Tensor) and images.ndim == 5


def takes_video(reward) -> bool:
    """The reward scores whole clips: `takes_video = True` (wrappers such as train.faults.RetryingReward forward
    the attribute of the reward they wrap)."""
    return bool(getattr(reward, "takes_video", False))


def num_samples(images) -> int:
    """N of images (N, C, H, W) / a list of N PIL images, or of videos (N, F, C, H, W)."""
    return images.shape[0] if is_video(images) else num_images(images)


def score_batch(reward, images, prompts: Sequence[str], metadata: Sequence[dict] | None) -> dict[str, torch.Tensor]:
    """reward(images, prompts, metadata); videos by frame for an image reward (module docstring): the F frames of
    video i are rows i F .. i F + F - 1 of one call, with video i's prompt and metadata."""
    if not is_video(images) or takes_video(reward):
        return reward(images, prompts, metadata)
    n, f = images.shape[:2]
    repeat = lambda items: None if items is None else [x for x in items for _ in range(f)]
    out = reward(images.flatten(0, 1), repeat(prompts), repeat(metadata))
    name = getattr(reward, "name", type(reward).__name__)
    check_reward_output(name, out, n * f)
    per_frame = {k: as_scores(f"{name}.{k}" if k != "reward" else name, v, n * f).view(n, f) for k, v in out.items()}
    result = {k: v.mean(1) for k, v in per_frame.items()}
    result[FRAME_STD] = per_frame["reward"].std(1, unbiased=False)
    return result


def num_images(images) -> int:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images: expected a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        return images.shape[0]
    if isinstance(images, (list, tuple)):
        return len(images)
    raise TypeError(f"images: expected a (N, C, H, W) tensor in [0, 1] or a list of PIL images, got {type(images).__name__}")


def to_uint8_arrays(images) -> list[np.ndarray]:
    """N RGB uint8 arrays (H, W, 3): round(clamp(x, 0, 1) * 255) for tensors, convert("RGB") for PIL images."""
    if isinstance(images, torch.Tensor):
        num_images(images)
        x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"images: expected 1 or 3 channels, got {x.shape[1]}")
        return list(x.permute(0, 2, 3, 1).contiguous().numpy())
    num_images(images)
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"images[{i}]: expected a PIL image, got {type(im).__name__}")
        out.append(np.asarray(im.convert("RGB")))
    return out


def to_pil(images) -> list[Image.Image]:
    """N RGB PIL images (tensor input goes through `to_uint8_arrays`)."""
    if not isinstance(images, torch.Tensor) and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images):
        return list(images)
    return [Image.fromarray(a) for a in to_uint8_arrays(images)]


def as_scores(name: str, values: Any, batch: int) -> torch.Tensor:
    """A (batch,) float32 tensor from a tensor / list / array; ValueError naming the reward otherwise."""
    try:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, torch.Tensor) else values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward {name!r} returned scores that are not numbers ({exc})") from None
    t = t.detach().float().reshape(-1).cpu()
    if t.numel() != batch:
        raise ValueError(f"reward {name!r} returned {t.numel()} scores for {batch} images")
    return t


def check_batch(name: str, images, prompts: Sequence[str], metadata: Sequence[dict] | None) -> int:
    """N, after checking that prompts (and metadata when given) have one entry per image."""
    n = num_images(images)
    if len(prompts) != n:
        raise ValueError(f"reward {name!r}: {len(prompts)} prompts for {n} images")
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"reward {name!r}: {len(metadata)} metadata entries for {n} images")
    return n


def require(module: str, reward: str, pip: str):
    """Import an optional package or raise ImportError with the `pip install` line that fixes it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reward {reward!r} needs the package {module!r}: pip install {pip}") from None


def hub_kwargs(source: str) -> dict:
    """from_pretrained kwargs: local_files_only for a local folder or when HF_HUB_OFFLINE=1."""
    return {"local_files_only": True} if Path(source).is_dir() or hub_offline() else {}


def load_pretrained(loader, source: str, *, reward: str, what: str, option: str):
    """`loader.from_pretrained(source)`, turning any failure into ONE FileNotFoundError line that names the reward,
    the missing model and how to get it (download, then pass the folder as option `option`)."""
    hint = f"(`hf download {source}` on a machine with network) and pass the local folder as {option}=PATH"
    local = source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
    if local and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"reward {reward!r}: the {what} folder {source!r} does not exist; download it {hint}")
    path = str(Path(source).expanduser()) if local else source
    if not local and hub_offline():  # resolve the cached snapshot ourselves: some loaders still probe the hub
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(source, local_files_only=True)
        except Exception:  # LocalEntryNotFoundError and friends: not in the cache
            raise FileNotFoundError(f"reward {reward!r}: the {what} {source!r} is not in the local hub cache and "
                                    f"HF_HUB_OFFLINE=1; download it {hint}") from None
    try:
        return loader.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError, EnvironmentError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise FileNotFoundError(
            f"reward {reward!r}: cannot load the {what} {source!r} ({first}); download it {hint}") from None


