"""Reward registry: `load_reward(name_or_import_path, **options)` and the trainer's `build_reward`.

Names: digits, jpeg_compressibility, jpeg_incompressibility, pickscore, clipscore, aesthetic, ocr, geneval, hpsv2,
imagereward, vlm_judge (a VLM over an OpenAI-compatible chat API), http (a reward served over HTTP by
`awm-fast serve-reward`);
"package.module:function" for a user reward; several joined by "+" for a weighted sum (CombinedReward).
Model-based rewards import their dependencies only when built.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from awm_fast.rewards.base import Reward, check_reward_output
from awm_fast.rewards.combined import CombinedReward, FunctionReward, reward_from_import_path


def _digits(classifier=None):
    from awm_fast.rewards.digits import DigitsReward

    if classifier is None:
        raise ValueError("reward 'digits' needs the digits task's classifier")
    return DigitsReward(classifier)


@dataclasses.dataclass(frozen=True)
class LazyReward:
    """A registered reward class, imported when built: `awm_fast.rewards.<module>.<cls>(**fixed, **options)`."""

    module: str
    cls: str
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def target(self) -> Callable:
        return getattr(importlib.import_module(f"awm_fast.rewards.{self.module}"), self.cls)

    def signature(self) -> inspect.Signature:
        """The options a user may pass: the constructor's parameters less the fixed ones."""
        sig = inspect.signature(self.target())
        return sig.replace(parameters=[p for name, p in sig.parameters.items() if name not in self.fixed])

    def __call__(self, **options):
        return self.target()(**self.fixed, **options)


REWARDS: dict[str, Callable] = {
    "digits": _digits,
    "jpeg_compressibility": LazyReward("jpeg", "JpegReward", {"compressible": True}),
    "jpeg_incompressibility": LazyReward("jpeg", "JpegReward", {"compressible": False}),
    "pickscore": LazyReward("pickscore", "PickScoreReward"),
    "clipscore": LazyReward("clipscore", "ClipScoreReward"),
    "aesthetic": LazyReward("aesthetic", "AestheticReward"),
    "ocr": LazyReward("ocr", "OcrReward"),
    "geneval": LazyReward("geneval", "GenEvalReward"),
    "hpsv2": LazyReward("hpsv2", "HPSv2Reward"),
    "imagereward": LazyReward("imagereward", "ImageRewardReward"),
    "vlm_judge": LazyReward("vlm_judge", "VlmJudgeReward"),  # a VLM over an OpenAI-compatible chat API
    "http": LazyReward("http", "HttpReward"),  # a reward served by `awm-fast serve-reward` (rewards/http.py)
}

# Model rewards made for generated pictures, not for the digits task's 8x8 digits (config.validate refuses them there)
NOT_FOR_DIGITS = ("pickscore", "clipscore", "aesthetic", "ocr", "geneval", "hpsv2", "imagereward", "vlm_judge")


def _load_one(name: str, options: dict):
    if ":" in name:
        return reward_from_import_path(name, **options)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} (known: {', '.join(REWARDS)}; or 'package.module:function')")
    builder = REWARDS[name]
    signature = builder.signature() if isinstance(builder, LazyReward) else inspect.signature(builder)
    try:
        signature.bind(**options)  # options the builder does not take, or a missing required one
    except TypeError as exc:
        raise TypeError(f"reward {name!r}: bad option ({exc})") from None
    return builder(**options)  # a TypeError from inside the constructor is its own, not a bad option


def _accepted(name: str) -> list[str] | None:
    """The option names registered reward `name` takes (the digits classifier is the task's, not an option);
    None when it takes any (a `**kwargs` constructor) or cannot be known before import (an import path)."""
    builder = REWARDS.get(name)
    if builder is None:
        return None
    signature = builder.signature() if isinstance(builder, LazyReward) else inspect.signature(builder)
    params = [p for p in signature.parameters.values() if not (name == "digits" and p.name == "classifier")]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def unknown_option(name: str, options: dict) -> tuple[str, str] | None:
    """The first key of `options` (reward.options) that reward `name` does not take, as (its dotted path inside
    options, what is taken there), or None. A combination "a+b" takes one mapping per component, keyed by the
    component's name; import-path rewards are not checked (their options are known only once imported)."""
    parts = [p.strip() for p in name.split("+")]
    if len(parts) == 1:
        taken = _accepted(parts[0])
        bad = [k for k in options if taken is not None and k not in taken]
        return (bad[0], ", ".join(taken) or "no options") if bad else None
    for key, sub in options.items():
        if key not in parts:
            return key, "one mapping per component: " + ", ".join(parts)
        if not isinstance(sub, dict):
            return key, f"a mapping of {key}'s options"
        found = unknown_option(key, sub)
        if found:
            return f"{key}.{found[0]}", found[1]
    return None


def load_reward(name: str, **options) -> Reward:
    """A reward from a registered name, an import path "package.module:function", or several of them joined by "+".

    For one reward, `options` go to its constructor (e.g. load_reward("pickscore", model="/ckpt/PickScore_v1")).
    For "a+b": `weights=[w_a, w_b]` (default all 1) and per-component options keyed by component name,
    e.g. load_reward("pickscore+jpeg_compressibility", weights=[1.0, 0.05], pickscore={"device": "cuda"}).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    parts = [p.strip() for p in name.split("+")]
    if len(parts) == 1:
        if "weights" in options and options["weights"] not in (None, [], [1], [1.0]):
            raise ValueError(f"reward {name!r}: weights={options['weights']} given for a single reward")
        options.pop("weights", None)
        return _load_one(parts[0], options)
    weights = options.pop("weights", None)
    unknown = set(options) - set(parts)
    if unknown:
        raise ValueError(f"reward {name!r}: options {sorted(unknown)} do not name a component (options of a combined "
                         f"reward are keyed by component, e.g. {parts[0]}={{...}})")
    return CombinedReward([_load_one(p, dict(options.get(p) or {})) for p in parts], weights)


def build_reward(name: str, *, digits_classifier=None, weights: list[float] | None = None, **options) -> Reward:
    """The trainer's entry point: `load_reward`, with the digits task's classifier passed through."""
    parts = [p.strip() for p in name.split("+")]
    if parts == ["digits"]:
        return _digits(digits_classifier)
    if "digits" in parts:
        options["digits"] = {**(options.get("digits") or {}), "classifier": digits_classifier}
    return load_reward(name, weights=weights or None, **options)


__all__ = ["REWARDS", "CombinedReward", "FunctionReward", "LazyReward", "Reward", "build_reward",
           "check_reward_output", "load_reward", "unknown_option"]
