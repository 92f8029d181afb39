"""CLIPScore (Hessel et al. 2021): score_i = w * max(cos(E_img(x_i), E_txt(p_i)), 0), w = 2.5 by default.

Default model "openai/clip-vit-large-patch14" (processor and model from the same id or local folder unless
`processor` is given). The raw cosine is also reported as "clip_cosine".
"""
from __future__ import annotations

import torch

from awm_fast.rewards.base import check_batch
from awm_fast.rewards.clip_common import ClipBackbone

MODEL = "openai/clip-vit-large-patch14"


class ClipScoreReward:
    name = "clipscore"

    def __init__(self, model: str = MODEL, processor: str | None = None, device=None, dtype: str = "float32",
                 weight: float = 2.5) -> None:
        if weight <= 0:
            raise ValueError(f"reward 'clipscore': weight={weight} must be > 0")
        self.clip = ClipBackbone(reward=self.name, processor=processor or model, model=model, device=device, dtype=dtype)
        self.weight = float(weight)

    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_batch(self.name, images, prompts, metadata)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1).cpu()
        return {"reward": self.weight * cos.clamp_min(0), "clip_cosine": cos}
