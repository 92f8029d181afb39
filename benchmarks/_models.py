"""Model shapes of the phase benchmark (random weights) and their FLOP counts.

SD3.5-Medium-shaped MMDiT: diffusers' SD3Transformer2DModel with the real architecture config; 512 px ->
16x64x64 latents (1024 image tokens at patch 2), 205 text tokens (77 CLIP + 128 T5, as the official RL code).

Forward matmul FLOPs per image (FLOP = 2 multiply-adds) for N = (H/p)(W/p) image tokens, L text tokens,
d = heads x head_dim (= caption_projection_dim), J = joint_attention_dim, P = pooled dim, C/Co = in/out
channels, p = patch, B = num_layers, K = dual-attention blocks (attn2 on the image tokens only):

    embed  = N (C p^2) d  +  L J d  +  256 d + d^2 + P d + d^2          (patch conv, context, time, pooled)
    block  = 4 N d^2 + 8 N d^2                                             (image q/k/v/out, MLP 4d)
           + 4 L d^2 + 8 L d^2                                             (text q/k/v/out, MLP; last block: 3 L d^2)
           + 2 (N + L)^2 d                                                 (Q K^T and A V over all heads)
           + 6 d^2 + 6 d^2                                                 (adaLN of both streams; last text: 2 d^2)
    dual   = 4 N d^2 + 2 N^2 d + 3 d^2                                     (attn2; its adaLN takes 9 d^2, not 6)
    out    = 2 d^2 + N d (p^2 Co)                                          (final adaLN, projection)
    F_fwd  = 2 (embed + B block + K dual + out)  (with the last block's text stream reduced as noted)

At SD3.5-M, 512 px, L = 205 this is 2.22 TFLOP per image. The backward of the LoRA-only training (input
gradients through every frozen matmul, attention backward, LoRA weight gradients) is counted once with
torch.utils.flop_counter.FlopCounterMode, as is the forward (a check of the formula). Model FLOPs per
trained image = T (3 F_fwd + F_bwd): policy, reference and EMA forwards and the policy backward; the
shared batch's recomputed policy forward is not model work and is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SD35M_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
TINY_CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=40,
                   pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
SD3_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                      shift_factor=0.0609, scaling_factor=1.5305)
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                       shift_factor=0.0609, scaling_factor=1.5305)


@dataclass(frozen=True)
class ModelSpec:
    """A transformer + VAE shape and the workload of the AWM presets (official numbers by default)."""

    name: str
    transformer: dict
    vae: dict
    latent: tuple[int, int, int]
    text_len: int
    rollout_batch: int = 6
    micro_batch: int = 3
    num_timesteps: int = 6
    num_steps: int = 14
    guidance_scale: float = 4.5
    lora_rank: int = 32
    cpu_reps: int = 3  # timed calls per phase on a CPU (GPU: 5, --quick: 3)


def model_spec(size: str) -> ModelSpec:
    """"full"/"quick": the SD3.5-M shape at 512 px; "cpu": tiny MMDiT, 16x16x16; "tiny": 16x8x8, 4 steps."""
    if size in ("full", "quick"):
        return ModelSpec("sd35m-512px", SD35M_CONFIG, SD3_VAE_CONFIG, (16, 64, 64), 205)
    if size == "cpu":
        return ModelSpec("tiny-mmdit-cpu", TINY_CONFIG, TINY_VAE_CONFIG, (16, 16, 16), 24, lora_rank=4)
    if size == "tiny":
        return ModelSpec("tiny-mmdit-cpu", TINY_CONFIG, TINY_VAE_CONFIG, (16, 8, 8), 8, rollout_batch=2,
                         micro_batch=1, num_timesteps=2, num_steps=4, lora_rank=4, cpu_reps=2)
    raise ValueError(f"size={size!r} is not one of tiny, cpu, quick, full")


def mmdit_forward_flops(cfg: dict, latent_hw: tuple[int, int], text_len: int) -> int:
    """Matmul FLOPs of one SD3Transformer2DModel forward for one image (formula in the module docstring)."""
    p, heads, hd = cfg["patch_size"], cfg["num_attention_heads"], cfg["attention_head_dim"]
    d = heads * hd
    if cfg["caption_projection_dim"] != d:
        raise ValueError(f"caption_projection_dim={cfg['caption_projection_dim']} must equal heads x head_dim = {d}")
    h, w = latent_hw
    if h % p or w % p or text_len < 1:
        raise ValueError(f"latent {h}x{w} must be divisible by patch {p}, text_len={text_len} must be >= 1")
    n, el = (h // p) * (w // p), text_len
    blocks = cfg["num_layers"]
    dual = sum(1 for i in cfg.get("dual_attention_layers", ()) if i < blocks - 1)
    macs = n * cfg["in_channels"] * p * p * d + el * cfg["joint_attention_dim"] * d
    macs += 256 * d + d * d + cfg["pooled_projection_dim"] * d + d * d
    for i in range(blocks):
        last = i == blocks - 1
        macs += 12 * n * d * d + 2 * (n + el) ** 2 * d + 6 * d * d
        macs += (3 * el * d * d + 2 * d * d) if last else (12 * el * d * d + 6 * d * d)
    macs += dual * (4 * n * d * d + 2 * n * n * d + 3 * d * d)
    macs += 2 * d * d + n * d * p * p * cfg["out_channels"]
    return 2 * macs


def count_flops(fn) -> int:
    """Total FLOPs torch.utils.flop_counter.FlopCounterMode sees while fn() runs (forward and any backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def build_transformer(spec: ModelSpec, device: torch.device, seed: int = 0):
    """Random-weight SD3Transformer2DModel in float32, built directly on `device`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**spec.transformer)
    return model.eval().requires_grad_(False)


def build_vae(spec: ModelSpec, device: torch.device, seed: int = 0):
    """Random-weight SD3-shaped AutoencoderKL (decoder used), float32 on `device`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**spec.vae)
    return vae.eval().requires_grad_(False)
