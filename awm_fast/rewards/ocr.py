"""OCR reward with the official (flow_grpo / AWM) scoring.

    target     = the text inside the first pair of double quotes of the prompt, spaces removed, lower case
                 (metadata["text"] overrides it when present)
    recognised = the OCR lines joined in reading order, spaces removed, lower case
    reward     = 1                                                             if target is a substring of recognised
               = 1 - min(Levenshtein(recognised, target), len(target)) / len(target)   otherwise

Engines: "rapidocr" (default; `rapidocr_onnxruntime` bundles its ONNX models in the wheel and runs offline) or
"paddle" (PaddleOCR 2.x, English, no angle classifier, as the official code).
"""
from __future__ import annotations

import numpy as np
import torch

from awm_fast.rewards.base import check_batch, require, to_uint8_arrays

ENGINES = ("rapidocr", "paddle")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_text(text: str) -> str:
    return text.replace(" ", "").lower()


def target_text(prompt: str, meta: dict | None = None) -> str:
    """The quoted text of the prompt (first pair of double quotes), or metadata["text"]; not yet normalised."""
    if meta and "text" in meta:
        return str(meta["text"])
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"reward 'ocr': prompt {prompt!r} has no text in double quotes (and no metadata 'text')")
    return parts[1]


def ocr_score(recognised: str, target: str) -> float:
    """The official score (module docstring) of raw recognised text against a raw target."""
    rec, tgt = normalize_text(recognised), normalize_text(target)
    if tgt in rec:
        return 1.0
    return 1.0 - min(levenshtein(rec, tgt), len(tgt)) / len(tgt)


class _RapidEngine:
    def __init__(self, min_confidence: float) -> None:
        self.engine = require("rapidocr_onnxruntime", "ocr", "rapidocr_onnxruntime  (or: pip install awm-fast[ocr])").RapidOCR()
        self.min_confidence = min_confidence

    def __call__(self, image: np.ndarray) -> str:
        result, _ = self.engine(image, use_cls=False)
        return "".join(text for _, text, conf in (result or []) if float(conf) > self.min_confidence)


class _PaddleEngine:
    def __init__(self, min_confidence: float) -> None:
        paddleocr = require("paddleocr", "ocr", "paddlepaddle paddleocr==2.9.1")
        self.engine = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)
        self.min_confidence = min_confidence

    def __call__(self, image: np.ndarray) -> str:
        result = self.engine.ocr(image, cls=False)
        lines = result[0] if result and result[0] else []
        return "".join(text for _, (text, conf) in lines if float(conf) > self.min_confidence)


class OcrReward:
    """Reports "reward" (the official score) and "ocr_exact" (1 when the target is contained in the recognised text)."""

    name = "ocr"

    def __init__(self, engine: str = "rapidocr", min_confidence: float = 0.0) -> None:
        if engine not in ENGINES:
            raise ValueError(f"reward 'ocr': engine={engine!r} is not one of {ENGINES}")
        self.engine = (_RapidEngine if engine == "rapidocr" else _PaddleEngine)(float(min_confidence))

    def read(self, images) -> list[str]:
        """The recognised text of each image (raw, before normalisation)."""
        return [self.engine(a) for a in to_uint8_arrays(images)]

    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        n = check_batch(self.name, images, prompts, metadata)
        targets = [target_text(p, (metadata or [None] * n)[i]) for i, p in enumerate(prompts)]
        texts = self.read(images)
        scores = [ocr_score(t, g) for t, g in zip(texts, targets)]
        exact = [float(normalize_text(g) in normalize_text(t)) for t, g in zip(texts, targets)]
        return {"reward": torch.tensor(scores, dtype=torch.float32), "ocr_exact": torch.tensor(exact)}
