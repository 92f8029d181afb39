"""The embedded task: class-conditional digits on the digits family's tiny model (awm_fast.families.digits).

- Prompts: "0" .. "9"; evaluation: each digit `digits.eval_per_digit` times.
- Classifier: a small MLP trained on the train split of scikit-learn's bundled 8x8 digits; its held-out accuracy
  is reported. The reward of a sample is the classifier's probability of the prompted digit (rewards/digits.py).
Like the base model, the classifier is produced with a fixed seed from a forked RNG (families.digits.own_rng) and
cached on disk under `cache_root()/digits/classifier-<key>/`, so a cold cache computes what a warm one does.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from awm_fast.config import DigitsConfig, cache_root
from awm_fast.families.digits import (DigitsBase, cached_folder, load_digit_images, own_rng, prepare_base_model,
                                      split_indices)
from awm_fast.logs import progress_bar

logger = logging.getLogger(__name__)


class DigitClassifier(nn.Module):
    """MLP on the 64 pixels (inputs in [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@dataclass
class DigitsArtifacts(DigitsBase):
    """The family's base model and embedding table, and the task's classifier."""
    classifier: DigitClassifier
    classifier_accuracy: float


def train_classifier(steps: int, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Returns the classifier and its accuracy on the held-out split."""
    with own_rng(seed):
        return _train_classifier(steps, seed)


def _train_classifier(steps: int, seed: int) -> tuple[DigitClassifier, float]:
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digit_images()
    train_idx, test_idx = split_indices(len(images))
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in progress_bar(range(steps), desc="train digit classifier", unit="step", leave=False):
        idx = train_idx[torch.randint(0, len(train_idx), (128,), generator=g)]
        x = images[idx] + 0.05 * torch.randn(images[idx].shape, generator=g)
        loss = nn.functional.cross_entropy(clf(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return clf, acc


def _classifier_key(cfg: DigitsConfig) -> str:
    blob = json.dumps({"classifier_steps": cfg.classifier_steps, "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_digits(cfg: DigitsConfig) -> DigitsArtifacts:
    """The family's base model (families.digits.prepare_base_model) and the cached classifier, each produced
    (fixed seeds) and cached atomically when missing."""
    base = prepare_base_model(cfg)
    folder = cache_root() / "digits" / f"classifier-{_classifier_key(cfg)}"

    def fill(tmp: Path) -> None:
        logger.info(f"[digits] training the classifier (cached afterwards in {folder})")
        clf, acc = train_classifier(cfg.classifier_steps)
        tmp.mkdir(parents=True)
        torch.save(clf.state_dict(), tmp / "classifier.pt")
        (tmp / "done.json").write_text(json.dumps({"classifier_accuracy": acc}, indent=2))

    cached_folder(folder, fill)
    clf = DigitClassifier()
    clf.load_state_dict(torch.load(folder / "classifier.pt", weights_only=True))
    clf.eval()
    accuracy = float(json.loads((folder / "done.json").read_text())["classifier_accuracy"])
    return DigitsArtifacts(base.model_dir, base.text_encoder, clf, accuracy)
