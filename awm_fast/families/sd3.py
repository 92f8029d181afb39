"""SD3 / SD3.5 from a diffusers folder or hub id: transformer with LoRA, text encoders, VAE.

Prompts are encoded with the pipeline's three text encoders (CLIP-L, CLIP-G, T5 with model.text_tokens
tokens, 128 as the official RL code); latents are 16 x (res / f) x (res / f), f = the VAE's scale factor (8 for SD3.5); decode = VAE decode to [0, 1].
"""
from __future__ import annotations

import torch

from awm_fast.config import Config
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.pipeline import encode_all, from_pretrained, make_decoder, make_encoder, prompt_cache_dir
from awm_fast.models.policy import FlowPolicy
from awm_fast.sampling.timesteps import pipeline_sigmas


TRANSFORMER_CLASS, LORA_LOADER = "SD3Transformer2DModel", "SD3LoraLoaderMixin"


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import StableDiffusion3Pipeline

    return from_pretrained(StableDiffusion3Pipeline, "SD3", path, dtype)


def build_tiny(path):
    from awm_fast.families.tiny import build_tiny_sd3

    return build_tiny_sd3(path)


def build_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy:
    """All `prompts` (and "") are encoded up front; the text encoders are then released. The time grid is the
    pipeline scheduler's."""
    pipe = load_pipeline(cfg.model.path, dtype)
    side = cfg.model.resolution // pipe.vae_scale_factor
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).to(device)

    def encode_batch(chunk: list[str]):
        embeds, _, pooled, _ = pipe.encode_prompt(chunk, chunk, chunk, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=cfg.model.text_tokens)
        return embeds, pooled

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # free their memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return FlowPolicy(transformer, make_encoder(cache, device), make_decoder(pipe.vae.to(device)),
                      (transformer.config.in_channels, side, side), device, dtype,
                      sigmas=pipeline_sigmas(pipe.scheduler, cfg))
