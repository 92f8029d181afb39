"""Weighted combinations of rewards and user rewards plugged in by import path.

CombinedReward:  reward_i = sum_k w_k * r_k(x_i), each component r_k logged under its own name (e.g. "pickscore",
"jpeg_compressibility") and its sub-scores under their own keys ("<name>.<key>" when two components share a key).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Sequence

import torch

from awm_fast.rewards.base import as_scores, num_samples, score_batch


def import_object(path: str):
    """`package.module:attribute` (attribute may be dotted) -> the object; ValueError in one line otherwise."""
    if path.count(":") != 1:
        raise ValueError(f"reward import path {path!r} must look like 'package.module:function'")
    module_name, attr = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class FunctionReward:
    """A user callable `fn(images, prompts, metadata, **options)` returning N scores (tensor, list, array) or a dict
    with "reward" (N scores) and optional sub-scores. `images` is what the caller passed: a (N, C, H, W) tensor in
    [0, 1] or a list of PIL images; videos (N, F, C, H, W) when `fn` has `takes_video = True` (else its frames)."""

    def __init__(self, fn: Callable, name: str, **options) -> None:
        if not callable(fn):
            raise TypeError(f"reward {name!r}: {type(fn).__name__} is not callable")
        self.fn, self.name, self.options = fn, name, options
        self.takes_video = bool(getattr(fn, "takes_video", False))

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        n = num_samples(images)
        out = self.fn(images, prompts, metadata, **self.options)
        if isinstance(out, dict):
            if "reward" not in out:
                raise ValueError(f"reward {self.name!r} returned a dict without 'reward' (got {sorted(out)})")
            return {k: as_scores(f"{self.name}.{k}" if k != "reward" else self.name, v, n) for k, v in out.items()}
        return {"reward": as_scores(self.name, out, n)}


def reward_from_import_path(path: str, **options):
    """A class is instantiated with `options` (its instances are callables, named by their `name` attribute when they
    have one); a function gets `options` on each call. Either way the result is wrapped in FunctionReward, so lists,
    arrays and dicts of N scores all become the standard {"reward": (N,), ...} dict."""
    obj = import_object(path)
    name = options.pop("name", path)
    if inspect.isclass(obj):
        obj = obj(**options)
        options = {}
    if not callable(obj):
        raise TypeError(f"reward {path!r}: {type(obj).__name__} is not callable")
    return FunctionReward(obj, getattr(obj, "name", name) if not inspect.isfunction(obj) else name, **options)


class CombinedReward:
    """sum_k w_k * reward_k; components must have distinct names. Weights may be negative (a penalty). Videos go
    to each component as it takes them (rewards.base.score_batch: whole clips or frame by frame)."""

    takes_video = True  # dispatched per component

    def __init__(self, rewards: Sequence, weights: Sequence[float] | None = None) -> None:
        rewards = list(rewards)
        weights = [1.0] * len(rewards) if weights is None or len(weights) == 0 else [float(w) for w in weights]
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        if len(weights) != len(rewards):
            raise ValueError(f"CombinedReward: {len(weights)} weights for {len(rewards)} rewards "
                             f"({', '.join(r.name for r in rewards)})")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"CombinedReward: component names must be distinct, got {names}")
        self.rewards, self.weights = rewards, weights
        self.name = "+".join(names)

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        n = num_samples(images)
        total = torch.zeros(n, dtype=torch.float32)
        out: dict[str, torch.Tensor] = {}
        parts = []
        for reward, w in zip(self.rewards, self.weights):
            res = score_batch(reward, images, prompts, metadata)
            if "reward" not in res:
                raise ValueError(f"reward {reward.name!r} returned no 'reward' entry (got {sorted(res)})")
            r = as_scores(reward.name, res["reward"], n)
            total += w * r
            out[reward.name] = r
            parts.append((reward.name, res))
        for name, res in parts:
            for key, value in res.items():
                if key != "reward":
                    out[key if key not in out else f"{name}.{key}"] = as_scores(f"{name}.{key}", value, n)
        return {"reward": total, **out}
