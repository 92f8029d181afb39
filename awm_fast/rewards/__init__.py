"""Reward registry."""
from __future__ import annotations

from awm_fast.rewards.base import Reward, check_reward_output

MODEL_REWARDS = ("pickscore", "ocr", "geneval")


def build_reward(name: str, *, digits_classifier=None) -> Reward:
    if name == "digits":
        from awm_fast.rewards.digits import DigitsReward

        if digits_classifier is None:
            raise ValueError("reward 'digits' needs the digits task's classifier")
        return DigitsReward(digits_classifier)
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        from awm_fast.rewards.jpeg import JpegReward

        return JpegReward(compressible=name == "jpeg_compressibility")
    if name in MODEL_REWARDS:
        raise ValueError(f"reward {name!r} is not available in this version of awm-fast "
                         f"(available: digits, jpeg_compressibility, jpeg_incompressibility)")
    raise ValueError(f"unknown reward {name!r}")


__all__ = ["Reward", "build_reward", "check_reward_output"]
