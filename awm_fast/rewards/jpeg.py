"""JPEG (in)compressibility (DDPO): size_kB = len(JPEG(image, quality=95)) / 1000;
reward = -size_kB (compressibility) or +size_kB (incompressibility)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from awm_fast.rewards.base import to_uint8_arrays


def jpeg_sizes_kb(images, quality: int = 95) -> torch.Tensor:
    """Encoded JPEG size in kB of each image (a (N, C, H, W) tensor in [0, 1] or a list of PIL images)."""
    sizes = []
    for a in to_uint8_arrays(images):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    def __init__(self, compressible: bool = True, quality: int = 95) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg reward: quality={quality} must be in [1, 100]")
        self.sign = -1.0 if compressible else 1.0
        self.quality = int(quality)
        self.name = "jpeg_compressibility" if compressible else "jpeg_incompressibility"

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        sizes = jpeg_sizes_kb(images, self.quality)
        return {"reward": self.sign * sizes, "jpeg_kb": sizes}
