"""FLUX.1 (dev / schnell) from a diffusers folder or hub id: packed latents, guidance embedding, LoRA.

The trainer sees latents as (B, 16, H, W) like SD3; the transformer call packs them into 2x2 patches,
    (B, C, H, W) -> (B, H/2 * W/2, 4C),  img_ids[i, j] = (0, i, j),  txt_ids = 0,
passes timestep = t in float32 (FLUX scales by 1000 inside, after casting it to the latents' dtype, as
FluxPipeline does) and, for guidance-distilled models (dev), the guidance
value, then unpacks the predicted velocity. Attention goes through diffusers' dispatch
(`set_attention_backend`), mapped from our backend names.
The time grid is the one FluxPipeline steps through: set_timesteps(sigmas=linspace(1, 1/N, N), mu) for both
models, shifted dynamically (dev: mu from the packed sequence length) or statically (schnell: shift 1, so
1, .75, .5, .25, 0 at N = 4).
"""
from __future__ import annotations

import functools

import torch

from awm_fast.config import Config
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.attention import resolve_attention_backend, set_diffusers_attention
from awm_fast.models.pipeline import encode_all, from_pretrained, make_decoder, make_encoder, prompt_cache_dir
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import linear_input_sigmas, pipeline_sigmas

TRANSFORMER_CLASS, LORA_LOADER = "FluxTransformer2DModel", "FluxLoraLoaderMixin"
T5_TOKENS = 512


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def flux_call(transformer, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
    """v(x, t, c) for (B, C, H, W) latents; t in [0, 1]."""
    b, _, h, w = x.shape
    g = torch.full((b,), guidance, device=x.device, dtype=x.dtype) if transformer.config.guidance_embeds else None
    out = transformer(hidden_states=pack(x), encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                      timestep=t, img_ids=image_ids(h, w, x.device, x.dtype),
                      txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype), guidance=g,
                      return_dict=False)[0]
    return unpack(out, h, w)


def set_flux_attention(transformer, backend: str) -> None:
    set_diffusers_attention(transformer, backend, "FLUX")


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import FluxPipeline

    return from_pretrained(FluxPipeline, "FLUX", path, dtype)


load_flux_pipeline = load_pipeline


def build_tiny(path):
    from awm_fast.families.tiny import build_tiny_flux

    return build_tiny_flux(path)


def build_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy:
    """All `prompts` (and "") are encoded up front; the text encoders are then released. The time grid is the
    pipeline scheduler's on FluxPipeline's input sigmas linspace(1, 1/N, N), dynamically shifted (dev) for the packed
    image sequence length (side / 2)^2 or statically (schnell)."""
    pipe = load_pipeline(cfg.model.path, dtype)
    side = cfg.model.resolution // pipe.vae_scale_factor
    if side % 2:
        raise ValueError(f"model.resolution={cfg.model.resolution} gives odd latents ({side}); FLUX packs 2x2 patches")
    backend = resolve_attention_backend(cfg.model.attention_backend, device, dtype, skip=("flash3",))
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype, attention=lambda m: set_flux_attention(m, backend))
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).to(device)

    def encode_batch(chunk: list[str]):
        embeds, pooled, _ = pipe.encode_prompt(chunk, chunk, device=device, max_sequence_length=cfg.model.text_tokens)
        return embeds, pooled

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = pipe.text_encoder_2 = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    call = functools.partial(flux_call, guidance=cfg.model.guidance)
    return FlowPolicy(transformer, make_encoder(cache, device), make_decoder(pipe.vae.to(device)),
                      (transformer.config.in_channels // 4, side, side), device, dtype, call=call,
                      sigmas=functools.partial(pipeline_sigmas(pipe.scheduler, cfg, image_seq_len=(side // 2) ** 2),
                                               input_sigmas=linear_input_sigmas))
