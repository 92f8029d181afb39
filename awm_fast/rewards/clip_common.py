"""Shared CLIP plumbing for PickScore, CLIPScore and the LAION aesthetic predictor (transformers CLIPModel)."""
from __future__ import annotations

import torch

from awm_fast.env import DTYPES, pick_device
from awm_fast.rewards.base import load_pretrained, to_pil


def _features(out) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor (transformers 4.x) or an output whose pooler_output is
    the projected embedding (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 along the last dimension (float32)."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


class ClipBackbone:
    """A CLIP processor + CLIPModel, loaded once, frozen, in eval mode on `device` in `dtype`."""

    def __init__(self, *, reward: str, processor: str, model: str, device=None, dtype: str = "float32",
                 processor_option: str = "processor", model_option: str = "model") -> None:
        from transformers import AutoModel, AutoProcessor

        if dtype not in DTYPES:
            raise ValueError(f"reward {reward!r}: dtype={dtype!r} is not one of {tuple(DTYPES)}")
        self.device = pick_device(device, f"reward {reward!r} device")
        self.processor = load_pretrained(AutoProcessor, processor, reward=reward, what="CLIP processor",
                                         option=processor_option)
        model = load_pretrained(AutoModel, model, reward=reward, what="CLIP model", option=model_option)
        if not hasattr(model, "get_image_features"):
            raise ValueError(f"reward {reward!r}: {type(model).__name__} from {model!r} is not a CLIP model")
        self.model = model.eval().requires_grad_(False).to(self.device, DTYPES[dtype])
        self.dtype = DTYPES[dtype]

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """Unit-norm projected image embeddings (N, D), float32."""
        inputs = self.processor(images=to_pil(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        return normalize(_features(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings (N, D), float32; prompts padded and truncated to 77 tokens."""
        inputs = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return normalize(_features(self.model.get_text_features(**inputs)))

    def logit_scale(self) -> float:
        """exp(logit_scale), the model's learned inverse temperature (100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.detach().float().exp())
