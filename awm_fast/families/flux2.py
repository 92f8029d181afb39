"""FLUX.2 [klein] (4B / 9B, distilled or base) from a diffusers folder or hub id, as Flux2KleinPipeline runs it.

Latents: the trainer samples noise of the pipeline's own latent space, the VAE's 2x2-patchified and
batch-norm-normalised latents (C = 4 x vae latent channels = 128, side = resolution / 16). The transformer call
flattens them into tokens and back,
    (B, C, h, w) -> (B, h w, C),  img_ids[i h + j] = (0, i, j, 0),  txt_ids[l] = (0, 0, 0, l)   (T, H, W, L axes),
passes timestep = t = sigma in float32 (the pipeline passes timestep / 1000 = sigma; the transformer casts it to
the latents' dtype and scales by 1000 inside) and guidance = None; v = eps - x0, as the pipeline's Euler step
x <- x + (sigma' - sigma) v. Decode: z * sqrt(bn.running_var + eps) + bn.running_mean, un-patchify, vae.decode,
x / 2 + 1/2 clipped to [0, 1].

Prompts: the Qwen3 text encoder's hidden states 9, 18, 27 of the chat-templated prompt padded to
model.text_tokens (the pipeline's max_sequence_length, 512), stacked per token (joint dim 3 x hidden);
no pooled embedding, no token mask (the pipeline attends to the padding too).

Grid: FlowMatchEulerDiscreteScheduler with dynamic shifting at mu = compute_empirical_mu(L, N), which depends on
the image sequence length L = h w and on the step count N (the formula in `empirical_mu`).

Guidance: step-distilled checkpoints (model_index is_distilled, FLUX.2-klein-4B/9B: 4 steps) take no CFG, which
the pipeline ignores and we refuse; the base checkpoints (FLUX.2-klein-base-*) run true CFG with the empty
prompt, sample.guidance_scale (pipeline default 4.0, 50 steps). No guidance embedding (guidance_embeds false).
"""
from __future__ import annotations

import torch

from awm_fast.config import Config
from awm_fast.families.flux import set_flux_attention
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.attention import resolve_attention_backend
from awm_fast.models.pipeline import (encode_all, from_pretrained, lora_parameter_count, make_encoder, meta_transformer,
                                      parameter_count, prompt_cache_dir)
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import scheduler_grid

TRANSFORMER_CLASS, LORA_LOADER = "Flux2Transformer2DModel", "Flux2LoraLoaderMixin"
TEXT_ENCODER_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
# FLUX.2-klein-4B's transformer config (diffusers scripts/convert_flux2_to_diffusers.py, model_type "klein-4b";
# the same in black-forest-labs/FLUX.2-klein-4B transformer/config.json); 9B: 8 / 24 blocks, 32 heads, joint 12288.
REFERENCE_CONFIG = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                        guidance_embeds=False)
REFERENCE_CONFIG_9B = {**REFERENCE_CONFIG, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                       "joint_attention_dim": 12288}
# The attention projections of both block kinds: the double-stream blocks' image and text q/k/v/out (AWM's "attn"
# set), the single-stream blocks' fused qkv+MLP-in and attn+MLP-out projections (what diffusers'
# train_dreambooth_lora_flux2_klein.py targets by default; to_out named per block: attn.to_out of the double
# blocks is a ModuleList). 24 single blocks covers the 9B (the 4B has 20).
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "attn.to_qkv_mlp_proj",
                *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)]]


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h w, C), token i h + j = position (i, j)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h w, C) -> (B, C, h, w)."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, h, w)


def latent_ids(h: int, w: int, device) -> torch.Tensor:
    """(h w, 4) positions (0, i, j, 0) of the image tokens."""
    ids = torch.zeros(h, w, 4, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(-1, 4)


def text_ids(length: int, device) -> torch.Tensor:
    """(L, 4) positions (0, 0, 0, l) of the text tokens."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def flux2_call(transformer, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """v(x, t, c) for (B, C, h, w) latents; t = sigma in [0, 1] (float32)."""
    if cond.mask is not None:
        raise ValueError("FLUX.2 prompts are padded to model.text_tokens and attended in full: no token mask expected")
    _, _, h, w = x.shape
    out = transformer(hidden_states=pack(x), encoder_hidden_states=cond.embeds, timestep=t,
                      img_ids=latent_ids(h, w, x.device), txt_ids=text_ids(cond.embeds.shape[1], x.device),
                      guidance=None, return_dict=False)[0]
    return unpack(out, h, w)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's dynamic shift: for L <= 4300, mu is linear in N between the lines m_10(L) = a1 L + b1 (at N = 10)
    and m_200(L) = a2 L + b2 (at N = 200), a1 = 8.73809524e-5, b1 = 1.89833333, a2 = 1.6927e-4, b2 = 0.45666666:
        mu = m_200 + (N - 200) (m_200 - m_10) / 190;   for L > 4300, mu = m_200(L)."""
    m_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    return float(m_200 + (num_steps - 200) * (m_200 - m_10) / 190.0)


def flux2_sigmas(scheduler, image_seq_len: int, num_steps: int) -> torch.Tensor:
    """The N + 1 sigmas Flux2KleinPipeline steps through: set_timesteps(sigmas=linspace(1, 1/N, N),
    mu=empirical_mu(L, N)) on the pipeline's scheduler."""
    return scheduler_grid(scheduler, num_steps, mu=empirical_mu(image_seq_len, num_steps))


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """(B, 4c, h, w) -> (B, c, 2h, 2w), channel 4k + 2a + b -> pixel (2i + a, 2j + b) of channel k."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def make_flux2_decoder(vae, batch: int = 16):
    """latents -> images in [0, 1]: vae.decode(unpatchify(z sqrt(var + eps) + mean)) / 2 + 1/2, in batches."""
    vae.requires_grad_(False)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        out = []
        for z in latents.split(batch):
            z = unpatchify(z.float() * std + mean).to(vae.dtype)
            out.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    return decode


def check_guidance(cfg: Config, is_distilled: bool) -> None:
    """A step-distilled checkpoint takes no CFG (Flux2KleinPipeline ignores guidance_scale for it)."""
    s = cfg.sample
    if is_distilled and (s.guidance_scale != 1.0 or s.eval_guidance_scale != 1.0):
        raise ValueError(f"model.path={cfg.model.path!r} is step-distilled (is_distilled in model_index.json) and "
                         f"takes no classifier-free guidance: sample.guidance_scale={s.guidance_scale} and "
                         f"sample.eval_guidance_scale={s.eval_guidance_scale} must be 1 (CFG is for the klein base "
                         "models)")


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import Flux2KleinPipeline

    return from_pretrained(Flux2KleinPipeline, "FLUX.2 [klein]", path, dtype)


def build_tiny(path):
    from awm_fast.families.tiny.flux2 import build_tiny_flux2

    return build_tiny_flux2(path)


def build_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy:
    """All `prompts` (and "", CFG's unconditional prompt) are encoded up front; the text encoder is then released."""
    pipe = load_pipeline(cfg.model.path, dtype)
    check_guidance(cfg, bool(pipe.config.get("is_distilled", False)))
    patch = 2 * pipe.vae_scale_factor
    if cfg.model.resolution % patch:
        raise ValueError(f"model.resolution={cfg.model.resolution} must be a multiple of {patch} for FLUX.2 (VAE scale "
                         f"{pipe.vae_scale_factor}, 2x2 latent patches)")
    channels = pipe.transformer.config.in_channels
    if channels != 4 * pipe.vae.config.latent_channels:
        raise ValueError(f"transformer in_channels={channels} is not 4 x the VAE's {pipe.vae.config.latent_channels} "
                         "latent channels (FLUX.2 patchifies the latents 2x2)")
    side = cfg.model.resolution // patch
    backend = resolve_attention_backend(cfg.model.attention_backend, device, dtype, skip=("flash3",))
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype,
                                   attention=lambda m: set_flux_attention(m, backend))
    pipe.text_encoder.requires_grad_(False).to(device)

    def encode_batch(chunk: list[str]):
        embeds, _ = pipe.encode_prompt(chunk, device=device, max_sequence_length=cfg.model.text_tokens,
                                       text_encoder_out_layers=TEXT_ENCODER_LAYERS)
        return embeds, embeds.new_zeros(len(chunk), 0)

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    scheduler, seq_len = pipe.scheduler, side * side
    return FlowPolicy(transformer, make_encoder(cache, device), make_flux2_decoder(pipe.vae.to(device)),
                      (channels, side, side), device, dtype, call=flux2_call,
                      sigmas=lambda n: flux2_sigmas(scheduler, seq_len, n))


def forward_flops(config: dict, latent_shape: tuple[int, int, int], text_len: int) -> int:
    """Matmul FLOPs of one Flux2Transformer2DModel forward for one sample of (C, h, w) patchified latents
    (FLOP = 2 multiply-adds). N = h w image tokens, L text tokens, S = N + L, d = heads x head_dim,
    m = int(mlp_ratio d) (SwiGLU: its input projection is 2m wide), C/Co in/out channels, J joint dim,
    c_t = timestep_guidance_channels, g = 1 with a guidance embedding, B / B1 double / single blocks:

        embed  = N C d + L J d + (1 + g)(c_t d + d^2)          (x, context, timestep [+ guidance] MLP)
        mod    = 6 d^2 + 6 d^2 + 3 d^2                         (the shared double img / txt and single modulations)
        double = 4 S d^2 + 3 S m d + 2 S^2 d                   (q/k/v/out and SwiGLU MLP of both streams, attention)
        single = S d (3d + 2m) + S (d + m) d + 2 S^2 d         (fused qkv + MLP-in, fused out, attention)
        out    = 2 d^2 + N d Co                                (final adaLN, projection)
        F_fwd  = 2 (embed + mod + B double + B1 single + out)

    FLUX.2-klein-4B at 512 px (N = 1024) with L = 512: 10.2 TFLOP; 9B: 22.7 TFLOP."""
    c, h, w = latent_shape
    if c != config["in_channels"] or text_len < 1:
        raise ValueError(f"latent_shape={latent_shape} must have in_channels={config['in_channels']} channels, "
                         f"text_len={text_len} must be >= 1")
    d = config["num_attention_heads"] * config["attention_head_dim"]
    m = int(d * config.get("mlp_ratio", 3.0))
    n, el = h * w, text_len
    s = n + el
    c_out = config.get("out_channels") or c
    g = 1 if config.get("guidance_embeds", True) else 0
    p = config.get("patch_size", 1)
    macs = n * c * d + el * config["joint_attention_dim"] * d
    macs += (1 + g) * (config.get("timestep_guidance_channels", 256) * d + d * d) + 15 * d * d
    macs += config["num_layers"] * (4 * s * d * d + 3 * s * m * d + 2 * s * s * d)
    macs += config["num_single_layers"] * (s * d * (3 * d + 2 * m) + s * (d + m) * d + 2 * s * s * d)
    macs += 2 * d * d + n * d * p * p * c_out
    return 2 * macs


def training_memory_estimate(config: dict, latent_shape: tuple[int, int, int], text_len: int, rows: int,
                             lora_rank: int = 32, targets: list[str] = LORA_TARGETS) -> dict:
    """Device memory (bytes) of LoRA training with block checkpointing, from the parameter count of the
    transformer built on the meta device: bf16 frozen weights (2 P); the two float32 adapters, the trained one's
    gradient, AdamW moments and evaluation-EMA shadow (24 bytes per LoRA parameter of one adapter); the bf16 block
    inputs checkpointing keeps for the micro-batch's rows (2 rows S d per block); one block's recomputed
    activations (~40 bf16 values per token and width unit: the 9d fused projection, MLP, norms, their gradients);
    2 GiB of workspace. The text encoder (bf16, encoding only, released before training) is not counted. An
    estimate to decide whether to try, not a measurement."""
    model = meta_transformer(TRANSFORMER_CLASS, config)
    params, lora = parameter_count(model), lora_parameter_count(model, targets, lora_rank)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = latent_shape[1] * latent_shape[2] + text_len
    blocks = config["num_layers"] + config["num_single_layers"]
    checkpoints = 2 * rows * tokens * d * blocks
    recompute = 2 * rows * tokens * d * 40
    out = {"params": params, "lora_params": lora, "weights_bytes": 2 * params, "lora_bytes": 24 * lora,
           "activation_bytes": checkpoints + recompute}
    out["total_bytes"] = out["weights_bytes"] + out["lora_bytes"] + out["activation_bytes"] + 2 * 2**30
    return out
