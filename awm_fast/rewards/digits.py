"""Digits reward: the classifier's probability of the prompted digit; also reports accuracy (argmax == digit)."""
from __future__ import annotations

import torch

from awm_fast.families.digits import PROMPTS
from awm_fast.tasks.digits import DigitClassifier


class DigitsReward:
    name = "digits"
    image_size = (8, 8)  # the classifier's 64 pixels (served over HTTP: other sizes are refused with HTTP 400)

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        target = torch.tensor([PROMPTS.index(p) for p in prompts])
        logits = self.classifier(images.float().cpu() * 2 - 1)
        prob = logits.softmax(-1).gather(1, target[:, None])[:, 0]
        return {"reward": prob, "accuracy": (logits.argmax(-1) == target).float()}
