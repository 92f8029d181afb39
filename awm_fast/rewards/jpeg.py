"""JPEG (in)compressibility: the encoded size in kB at quality 95, negated for compressibility (DDPO)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(np.array(sizes), dtype=torch.float32)


class JpegReward:
    def __init__(self, compressible: bool) -> None:
        self.sign = -1.0 if compressible else 1.0
        self.name = "jpeg_compressibility" if compressible else "jpeg_incompressibility"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        sizes = jpeg_sizes_kb(images)
        return {"reward": self.sign * sizes, "jpeg_kb": sizes}
