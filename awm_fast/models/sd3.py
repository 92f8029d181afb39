"""SD3 / SD3.5 from a diffusers folder or hub id: transformer with LoRA, text encoders, VAE.

Prompts are encoded with the pipeline's three text encoders (CLIP-L, CLIP-G, T5, 128 T5 tokens as the
official RL code); latents are 16 x (res / 8) x (res / 8); decode = VAE decode to [0, 1].
"""
from __future__ import annotations

import os

import torch

from awm_fast.config import Config
from awm_fast.models.policy import Conditioning, FlowPolicy

T5_TOKENS = 128


def load_pipeline(path: str, dtype: torch.dtype):
    """StableDiffusion3Pipeline from a local folder or the hub cache; one clear line when it is missing."""
    from diffusers import StableDiffusion3Pipeline

    local_only = os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = "the folder" if os.path.isdir(path) else "the hub id (no network or not in the local cache)"
        raise FileNotFoundError(f"cannot load SD3 weights from model.path={path!r} via {where}: "
                                f"{str(exc).splitlines()[0]}") from None


def load_sd3_policy(cfg: Config, device: torch.device, dtype: torch.dtype) -> FlowPolicy:
    from awm_fast.models.load import freeze_and_adapt

    pipe = load_pipeline(cfg.model.path, dtype)
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
        if module is not None:
            module.requires_grad_(False).to(device)
    cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def encode(prompts: list[str]) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            embeds, _, pooled, _ = pipe.encode_prompt(missing, missing, missing, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=T5_TOKENS)
            for i, p in enumerate(missing):
                cache[p] = Conditioning(embeds[i:i + 1], pooled[i:i + 1])
        return Conditioning.cat([cache[p] for p in prompts])

    vae = pipe.vae

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    side = cfg.model.resolution // 8
    return FlowPolicy(transformer, encode, decode, (transformer.config.in_channels, side, side), device, dtype)
