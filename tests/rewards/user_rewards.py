"""User rewards loaded by import path in the tests ("tests.rewards.user_rewards:NAME")."""
import threading
import time

import torch


def brightness(images, prompts, metadata, scale=1.0):
    """A list of N floats: scale * mean pixel value."""
    return [scale * float(x.mean()) for x in images]


def brightness_dict(images, prompts, metadata):
    return {"reward": images.mean(dim=(1, 2, 3)), "red": images[:, 0].mean(dim=(1, 2))}


def wrong_length(images, prompts, metadata):
    return [0.0]


class Sleepy:
    """Sleeps `seconds` per call, then returns the batch index carried in metadata."""

    name = "sleepy"

    def __init__(self, seconds=0.2):
        self.seconds = seconds

    def __call__(self, images, prompts, metadata):
        time.sleep(self.seconds)
        return {"reward": torch.tensor([float(m["batch"]) for m in metadata])}


HANG_CALLS: list[float] = []  # time.monotonic() of each call of `hang`


def hang(images, prompts, metadata, seconds=120.0):
    """Never answers in time: blocks `seconds` (reward.timeout_s stops the run first)."""
    HANG_CALLS.append(time.monotonic())
    threading.Event().wait(seconds)
    return [0.0] * len(prompts)
