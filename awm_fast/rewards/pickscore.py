"""PickScore (Kirstain et al. 2023): a CLIP-H model fine-tuned on Pick-a-Pic human preferences.

    score_i = exp(logit_scale) * cos(E_img(x_i), E_txt(p_i)) / 26

as the official flow_grpo/AWM scorer (exp(logit_scale) is about 100, so scores sit near 0.8-0.9 for SD3.5 images).
Defaults: processor "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", model "yuvalkirstain/PickScore_v1"; both take a hub
id or a local folder (options `processor`, `model`).
"""
from __future__ import annotations

import torch

from awm_fast.rewards.base import check_batch
from awm_fast.rewards.clip_common import ClipBackbone

PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MODEL = "yuvalkirstain/PickScore_v1"


class PickScoreReward:
    name = "pickscore"

    def __init__(self, processor: str = PROCESSOR, model: str = MODEL, device=None, dtype: str = "float32",
                 divisor: float = 26.0) -> None:
        if divisor <= 0:
            raise ValueError(f"reward 'pickscore': divisor={divisor} must be > 0")
        self.clip = ClipBackbone(reward=self.name, processor=processor, model=model, device=device, dtype=dtype)
        self.divisor = float(divisor)

    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_batch(self.name, images, prompts, metadata)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return {"reward": (self.clip.logit_scale() * cos / self.divisor).cpu()}
