"""Wan 2.1 / 2.2 text-to-video (diffusers `WanPipeline`) from a diffusers folder or hub id: video latents, true
CFG, LoRA on the self- and cross-attention projections.

Latents are (B, C, F', H', W') with F' = (model.frames - 1) / 4 + 1 (the VAE's temporal compression) and
H' = W' = model.resolution / 8 (its spatial one); the trainer, the rollout samplers, the SDE step and the AWM loss
treat them as rows x values like image latents. The transformer call passes them unpacked (the transformer
patchifies (1, 2, 2) itself) with

    timestep = 1000 t  (float32, per sample; per token for Wan 2.2 TI2V, `expand_timesteps`, as WanPipeline)

and returns v = eps - x0 (UniPC's flow_prediction: x0 = x_t - sigma v), the trainer's convention. WanPipeline
passes UniPC's integer timesteps int(1000 sigma) instead (e.g. 999 for sigma = 1 - 1e-6); ours is the continuous
1000 t, as the trainer's t is continuous (a difference below one timestep unit on the rollout grid).

Prompts: UMT5 embeddings of model.text_tokens tokens (512, the pipeline's default), the padding rows set to zero
as WanPipeline does (no mask, no pooled embedding: pooled is (B, 0)). Decode: the VAE on latents * latents_std +
latents_mean, then (x / 2 + 1/2) clamped: videos (B, F, 3, H, W) in [0, 1]. The grid: the pipeline's
UniPCMultistepScheduler (flow sigmas, flow_shift 3 at 480p) set for N steps, its first sigma 1 - 1e-6 read as 1
(sampling.timesteps.scheduler_grid). Guidance: true CFG, sample.guidance_scale (5 is Wan's default) with the empty
prompt "" as the unconditional, which is WanPipeline's default negative prompt (negative_prompt=None -> "");
the Wan repository's own sampler defaults to a long negative prompt instead.

Wan 2.2 A14B (two experts, `transformer_2` and `boundary_ratio`) is refused: the policy is one transformer, and
training one expert of the pair would leave the rollout's velocity field half frozen; Wan 2.2 TI2V-5B (one
transformer) and Wan 2.1 T2V 1.3B / 14B load.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from awm_fast.config import Config
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.attention import resolve_attention_backend, set_diffusers_attention
from awm_fast.models.pipeline import (encode_all, from_pretrained, make_encoder, meta_transformer, parameter_count,
                                      prompt_cache_dir)
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import scheduler_grid

logger = logging.getLogger(__name__)

TRANSFORMER_CLASS, LORA_LOADER = "WanTransformer3DModel", "WanLoraLoaderMixin"
# The attention projections of every block (self-attention attn1, cross-attention attn2): diffusers' Wan LoRA
# format (transformer.blocks.N.attn1.to_q ...) and what the community Wan LoRAs train.
LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
TEMPORAL_FACTOR = 4  # the Wan 2.1 / 2.2 VAEs' temporal compression (config.py checks model.frames against it)
# Wan2.1-T2V-1.3B's transformer config (diffusers scripts/convert_wan_to_diffusers.py, "Wan-T2V-1.3B"; the same
# dims as the Wan repository's wan/configs/wan_t2v_1_3B.py: dim 1536, ffn 8960, 12 heads, 30 layers)
REFERENCE_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None)


def latent_frames(frames: int, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """F' = (frames - 1) / temporal_factor + 1; ValueError unless frames - 1 is a multiple of the factor."""
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(f"model.frames={frames}: Wan needs frames - 1 divisible by {temporal_factor} "
                         f"(e.g. 33 or 81)")
    return (frames - 1) // temporal_factor + 1


def wan_call(transformer, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
             expand_timesteps: bool = False) -> torch.Tensor:
    """v(x, t, c) for (B, C, F', H', W') latents, t (B,) in [0, 1] (module docstring)."""
    timestep = t.float() * 1000
    if expand_timesteps:  # Wan 2.2 TI2V: one timestep per video token (all equal in text-to-video)
        b, _, f, h, w = x.shape
        p_t, p_h, p_w = transformer.config.patch_size
        timestep = timestep[:, None].expand(b, (f // p_t) * (h // p_h) * (w // p_w))
    return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds, return_dict=False)[0]


def make_video_decoder(vae, batch: int = 2):
    """latents (B, C, F', H', W') -> videos (B, F, 3, H, W) in [0, 1]: clamp(vae.decode(z std + mean) / 2 + 1/2)."""
    vae.requires_grad_(False)
    shape = (1, vae.config.z_dim, 1, 1, 1)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        out = []
        for z in latents.split(batch):
            video = vae.decode((z.float() * std + mean).to(vae.dtype), return_dict=False)[0]  # (b, 3, F, H, W)
            out.append((video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
        return torch.cat(out)

    return decode


def set_wan_attention(transformer, backend: str) -> None:
    set_diffusers_attention(transformer, backend, "Wan")


def keep_fp32_modules(transformer) -> None:
    """The parameters diffusers keeps in float32 when loading Wan in half precision (`_keep_in_fp32_modules`:
    rope, time embedder, modulation tables, norms) back to float32 after the model-wide cast."""
    keep = type(transformer)._keep_in_fp32_modules or []
    for name, p in transformer.named_parameters():
        if "lora_" not in name and any(k in name.split(".") for k in keep):
            p.data = p.data.float()


def load_pipeline(path: str, dtype: torch.dtype):
    """WanPipeline with the transformer and text encoder in `dtype`, the VAE in float32 (as the Wan examples)."""
    from diffusers import WanPipeline

    return from_pretrained(WanPipeline, "Wan", path, {"default": dtype, "vae": torch.float32})


def build_tiny(path):
    from awm_fast.families.tiny.wan import build_tiny_wan

    return build_tiny_wan(path)


def check_single_transformer(config) -> None:
    """ValueError unless a WanPipeline config (`pipe.config`, or a folder's model_index.json) has one transformer:
    `transformer` set, no `transformer_2`, no `boundary_ratio`."""
    def present(key: str) -> bool:
        value = config.get(key)
        return value is not None and list(value) != [None, None]

    if present("transformer_2") or config.get("boundary_ratio") is not None:
        raise ValueError("model.kind=wan: this pipeline has two experts (transformer_2, boundary_ratio: Wan 2.2 A14B); "
                         "awm-fast trains one transformer: use Wan2.1-T2V-1.3B / 14B or Wan2.2-TI2V-5B")
    if not present("transformer"):
        raise ValueError("model.kind=wan: the pipeline has no `transformer`")


def build_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy:
    """All `prompts` (and "") are encoded up front; the text encoder is then released."""
    index = Path(cfg.model.path) / "model_index.json"
    if index.is_file():  # refuse a two-expert folder before loading its 2 x 14B weights
        check_single_transformer(json.loads(index.read_text()))
    pipe = load_pipeline(cfg.model.path, dtype)
    check_single_transformer(pipe.config)
    spatial = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    if cfg.model.resolution % spatial:
        raise ValueError(f"model.resolution={cfg.model.resolution} must be a multiple of {spatial} for Wan "
                         f"(VAE {pipe.vae_scale_factor_spatial} x patch {pipe.transformer.config.patch_size[1]})")
    side = cfg.model.resolution // pipe.vae_scale_factor_spatial
    shape = (pipe.transformer.config.in_channels, latent_frames(cfg.model.frames, pipe.vae_scale_factor_temporal),
             side, side)
    backend = resolve_attention_backend(cfg.model.attention_backend, device, dtype, skip=("flash3",))
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype,
                                   attention=lambda m: set_wan_attention(m, backend))
    keep_fp32_modules(transformer)
    pipe.text_encoder.requires_grad_(False).to(device)

    def encode_batch(chunk: list[str]):
        embeds, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False,
                                       max_sequence_length=cfg.model.text_tokens, device=device)
        return embeds, embeds.new_zeros(embeds.shape[0], 0)

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flow_shift = pipe.scheduler.config.get("flow_shift", pipe.scheduler.config.get("shift", 1.0))
    if flow_shift != cfg.sample.shift:
        logger.info(f"[grid] the rollout grid is the scheduler's (flow_shift {flow_shift}); "
                    f"sample.shift={cfg.sample.shift} only shifts the uniform / logit_normal training timesteps")
    call = functools.partial(wan_call, expand_timesteps=bool(pipe.config.get("expand_timesteps", False)))
    return FlowPolicy(transformer, make_encoder(cache, device), make_video_decoder(pipe.vae.to(device)), shape,
                      device, dtype, call=call, sigmas=functools.partial(scheduler_grid, pipe.scheduler))


def forward_flops(config: dict, latent_shape: tuple[int, int, int, int], text_len: int) -> int:
    """Matmul FLOPs of one WanTransformer3DModel forward for one video of (C, F', H', W') latents (per-sample
    timestep). N = (F'/p_t)(H'/p_h)(W'/p_w) video tokens, L text tokens, d = heads x head_dim, f = ffn_dim,
    D = text_dim, q = freq_dim, P = p_t p_h p_w, B = num_layers (FLOP = 2 multiply-adds):

        embed = N (C P) d  +  L D d + L d^2  +  q d + d^2 + 6 d^2    (patch conv, text MLP, time MLP, time_proj)
        block = 4 N d^2 + 2 N^2 d                                    (self-attention q/k/v/out, Q K^T and A V)
              + 2 N d^2 + 2 L d^2 + 2 N L d                          (cross-attention q/out, k/v of the text, QK, AV)
              + 2 N d f                                              (feed-forward)
        out   = N d (Co P)                                           (projection)
        F_fwd = 2 (embed + B block + out)
    """
    c, f, h, w = latent_shape
    p_t, p_h, p_w = config["patch_size"]
    if f % p_t or h % p_h or w % p_w or text_len < 1:
        raise ValueError(f"latents {latent_shape} must divide by the patch {config['patch_size']}, "
                         f"text_len={text_len} must be >= 1")
    n, el = (f // p_t) * (h // p_h) * (w // p_w), text_len
    d, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    patch = p_t * p_h * p_w
    embed = n * c * patch * d + el * config["text_dim"] * d + el * d * d + config["freq_dim"] * d + d * d + 6 * d * d
    block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * d + 2 * el * d * d + 2 * n * el * d + 2 * n * d * ffn
    out = n * d * (config.get("out_channels") or c) * patch
    return 2 * (embed + config["num_layers"] * block + out)


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB of one training process (LoRA, gradient checkpointing, the text encoder released)."""

    params: int
    weights_gib: float  # the frozen transformer in its dtype
    lora_gib: float  # both adapters (float32) + the policy adapter's gradient and two AdamW moments
    checkpoints_gib: float  # the block inputs kept for backward, every row of the micro-batch
    block_gib: float  # one block's forward activations, recomputed in backward, every row
    total_gib: float


def training_memory(config: dict, latent_shape: tuple[int, int, int, int], text_len: int, rows: int, *,
                    lora_rank: int, lora_modules_per_block: int = len(LORA_TARGETS), weight_bytes: int = 2
                    ) -> MemoryEstimate:
    """A first-order estimate from the parameter count (the transformer built on the meta device):

        weights = params x weight_bytes;  LoRA = 2 r d per projection, x (2 adapters + grad + 2 Adam) x 4 bytes
        checkpoints = B N d x 2 bytes per row (bf16 block inputs)
        block = N (21 d + 2 f) x 2 bytes per row (one block's saved tensors: norms, q/k/v, attention outputs,
                the fp32 residual copies, the feed-forward's two f-wide activations)
    The VAE decode (float32, batches of 2) and the allocator's slack come on top; the rollout needs less."""
    params = parameter_count(meta_transformer(TRANSFORMER_CLASS, config))
    c, f, h, w = latent_shape
    p_t, p_h, p_w = config["patch_size"]
    n = (f // p_t) * (h // p_h) * (w // p_w)
    d, blocks = config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    gib = 2.0 ** 30
    lora = blocks * lora_modules_per_block * 2 * lora_rank * d * 4 * 5
    checkpoints = rows * blocks * n * d * 2
    block = rows * n * (21 * d + 2 * config["ffn_dim"]) * 2
    weights = params * weight_bytes
    return MemoryEstimate(params, weights / gib, lora / gib, checkpoints / gib, block / gib,
                          (weights + lora + checkpoints + block) / gib)

