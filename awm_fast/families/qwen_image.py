"""Qwen-Image (Qwen/Qwen-Image, diffusers' QwenImagePipeline) from a diffusers folder or hub id.

Prompts: Qwen2.5-VL's last hidden states of the pipeline's chat template with the prompt inserted, the template's
first 34 tokens (its system prefix) dropped, at most model.text_tokens tokens kept (max_sequence_length, <= 1024);
prompts have their own lengths, so the conditioning carries the token mask (the pipeline's prompt_embeds_mask).
A batch is padded (mask False) to a multiple of TEXT_PAD tokens: masked keys get zero attention weight and the
padded text rows never reach the image tokens, so the velocity equals the pipeline's (padded to the batch's longest
prompt) while compiled blocks and CUDA graphs see a few text lengths instead of one per prompt length.

Latents: the trainer's (B, C, H, W), C = 16 at res / 8 (the VAE's frame axis of 1 removed); the call packs 2x2
patches as the pipeline does, (B, C, H, W) -> (B, H/2 * W/2, 4C), with img_shapes = [(1, H/2, W/2)] per row for
the transformer's RoPE, and unpacks the prediction. The transformer takes timestep = t in [0, 1] (the pipeline
passes its scheduler timestep / 1000) and predicts v = eps - x0, the trainer's convention; t goes in float32 and
the transformer casts it to its hidden dtype itself (bf16 in the presets, as in the pipeline).

Grid: the scheduler's own (Qwen-Image's: exponential time shift with mu = m L + b from the packed sequence length L
between (256, 0.5) and (8192, 0.9), stretched to the terminal sigma 0.02), via sampling.timesteps.scheduler_grid.

Guidance: Qwen-Image is not guidance-distilled; the pipeline runs true CFG only with a negative prompt (model card:
negative_prompt " ", true_cfg_scale 4) as v = v_neg + w (v_cond - v_neg), then rescales each packed token's
prediction to the conditional norm, v * |v_cond| / |v| (norm over the 64 packed channels). Our CFG path
(sample.guidance_scale != 1) uses the empty prompt "" as the unconditional one and does not rescale.

decode(z) = clamp(vae.decode(z / (1 / std) + mean)[frame 0] / 2 + 1/2, 0, 1), latents_mean/std per channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from awm_fast.config import Config
from awm_fast.families.flux import pack, unpack
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.attention import DIFFUSERS_BACKENDS, resolve_attention_backend
from awm_fast.models.pipeline import (encode_all, from_pretrained, make_encoder, meta_transformer, parameter_count,
                                      prompt_cache_dir)
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import pipeline_sigmas

TRANSFORMER_CLASS, LORA_LOADER = "QwenImageTransformer2DModel", "QwenImageLoraLoaderMixin"
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out"]  # the joint attention's image and text projections
MAX_TEXT_TOKENS = 1024  # the pipeline's limit on max_sequence_length
TEXT_PAD = 32
# Our names -> diffusers' attention dispatch names, for the backends that apply the prompts' attention mask.
MASKED_BACKENDS = {k: DIFFUSERS_BACKENDS[k] for k in ("sdpa_cudnn", "sdpa_efficient", "sdpa_math")}
UNMASKED_BACKENDS = {
    "flash3": "takes no attention mask", "flash2": "takes no attention mask", "sdpa_flash": "takes no attention mask",
    # diffusers 0.42's xformers path casts the processor's (B, 1, 1, S) boolean mask to 1.0 / 0.0 and adds it
    # as a bias: padding tokens would be attended to
    "xformers": "does not apply a 4-D boolean attention mask"}
# `auto` picks sdpa_efficient (CUDA) or sdpa_math: masked attention with a backward pass in every PyTorch build;
# cuDNN's masked attention depends on the cuDNN version (sdpa_cudnn on request).
AUTO_SKIP = ("flash3", "flash2", "sdpa_flash", "sdpa_cudnn", "xformers")
# Qwen/Qwen-Image transformer/config.json (the diffusers class defaults are the same values)
REFERENCE_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                        axes_dims_rope=(16, 56, 56))


def image_shapes(batch: int, h: int, w: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's img_shapes for (C, h, w) latents: one (frames, rows, columns) of 2x2 patches per row."""
    return [[(1, h // 2, w // 2)]] * batch


def qwen_image_call(transformer, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """v(x, t, c) for (B, C, H, W) latents, t in [0, 1] per row; cond.mask: the prompts' token mask (or None)."""
    b, _, h, w = x.shape
    out = transformer(hidden_states=pack(x), encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=cond.mask,
                      timestep=t, img_shapes=image_shapes(b, h, w), return_dict=False)[0]
    return unpack(out, h, w)


def set_qwen_attention(transformer, backend: str) -> None:
    if backend not in MASKED_BACKENDS:
        reason = UNMASKED_BACKENDS.get(backend, "is unknown")
        raise ValueError(f"model.attention_backend={backend} {reason} in diffusers' attention dispatch, and "
                         f"Qwen-Image's prompts of different lengths need one: use one of {tuple(MASKED_BACKENDS)}")
    transformer.set_attention_backend(MASKED_BACKENDS[backend])


def qwen_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """An explicit, available model.attention_backend as given (then checked by set_qwen_attention); auto or an
    unavailable one: sdpa_efficient on CUDA, sdpa_math elsewhere."""
    return resolve_attention_backend(name, device, dtype, skip=AUTO_SKIP)


def freeze_discarded_lora(transformer) -> list[str]:
    """The LoRA weights of the last block's text-stream output (attn.to_add_out, txt_mlp) set to not require grad:
    the transformer computes that output and discards it, so they would never get a gradient, and DDP (without
    find_unused_parameters) stops when a trainable parameter gets none. They stay in the adapter with B = 0 (a zero
    delta, saved and loaded as the rest). Returns their names."""
    last = len(transformer.transformer_blocks) - 1
    prefixes = (f"transformer_blocks.{last}.attn.to_add_out.", f"transformer_blocks.{last}.txt_mlp.")
    frozen = [n for n, p in transformer.named_parameters()
              if "lora_" in n and n.startswith(prefixes) and p.requires_grad]
    for name in frozen:
        transformer.get_parameter(name).requires_grad_(False)
    return frozen


def padded_encoder(cache: dict[str, Conditioning], device: torch.device, multiple: int = TEXT_PAD):
    """encode(prompts) -> Conditioning with the token mask, its length padded to a multiple of `multiple`."""
    encode = make_encoder(cache, torch.device("cpu"))

    def padded(prompts: list[str]) -> Conditioning:
        c = encode(prompts)
        mask = c.mask if c.mask is not None else torch.ones(c.embeds.shape[:2], dtype=torch.bool)
        pad = -c.embeds.shape[1] % multiple
        return Conditioning(F.pad(c.embeds, (0, 0, 0, pad)), c.pooled, F.pad(mask, (0, pad), value=False)).to(device)

    return padded


def make_qwen_decoder(vae, batch: int = 8):
    """latents (B, C, H, W) -> images in [0, 1], as QwenImagePipeline decodes (see the module docstring)."""
    vae.requires_grad_(False)
    c = vae.config.z_dim

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        out = []
        for z in latents.split(batch):
            z = z.to(vae.dtype)[:, :, None] / inv_std + mean
            out.append((vae.decode(z, return_dict=False)[0][:, :, 0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    return decode


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import QwenImagePipeline

    return from_pretrained(QwenImagePipeline, "Qwen-Image", path, dtype)


def build_tiny(path):
    from awm_fast.families.tiny.qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(path)


def build_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy:
    """All `prompts` (and "") are encoded first (the text encoder moved to the device only if some prompt is not
    cached), the text encoder released, then the transformer moved and adapted: the 7B text encoder and the 20B
    transformer are never on the device together."""
    if cfg.model.text_tokens > MAX_TEXT_TOKENS:
        raise ValueError(f"model.text_tokens={cfg.model.text_tokens}: QwenImagePipeline keeps at most "
                         f"{MAX_TEXT_TOKENS} prompt tokens")
    pipe = load_pipeline(cfg.model.path, dtype)
    if pipe.transformer.config.guidance_embeds:
        raise ValueError(f"{cfg.model.path}: a guidance-distilled Qwen-Image transformer (guidance_embeds) is not "
                         "supported; Qwen-Image uses true CFG (sample.guidance_scale)")
    side = cfg.model.resolution // pipe.vae_scale_factor
    if cfg.model.resolution % pipe.vae_scale_factor or side % 2:
        raise ValueError(f"model.resolution={cfg.model.resolution} must be a multiple of {2 * pipe.vae_scale_factor} "
                         "(Qwen-Image packs 2x2 latent patches)")

    moved = []

    def encode_batch(chunk: list[str]) -> Conditioning:
        if not moved:
            moved.append(pipe.text_encoder.requires_grad_(False).to(device))
        embeds, mask = pipe.encode_prompt(chunk, device=device, max_sequence_length=cfg.model.text_tokens)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return Conditioning(embeds, embeds.new_zeros(len(chunk), 0), mask)

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    backend = qwen_attention_backend(cfg.model.attention_backend, device, dtype)
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype,
                                   attention=lambda m: set_qwen_attention(m, backend))
    if cfg.train.finetune == "lora":
        freeze_discarded_lora(transformer)
    return FlowPolicy(transformer, padded_encoder(cache, device), make_qwen_decoder(pipe.vae.to(device)),
                      (transformer.config.in_channels // 4, side, side), device, dtype, call=qwen_image_call,
                      sigmas=pipeline_sigmas(pipe.scheduler, cfg, image_seq_len=(side // 2) ** 2))


def forward_flops(config: dict, latent_shape: tuple[int, int, int], text_len: int) -> int:
    """Matmul FLOPs of one QwenImageTransformer2DModel forward for one sample of (C, H, W) latents (packed 2x2:
    N = H W / 4 image tokens of C_in = 4C channels) and L text tokens (padded ones included), d = heads x
    head_dim, J = joint_attention_dim, C_out = out_channels, p = patch, B = num_layers, S = N + L:

        embed = N C_in d + L J d + 256 d + d^2          (img_in, txt_in, timestep MLP)
        block = 12 S d^2 + 2 S^2 d + 12 d^2             (q/k/v/out 4 d^2 and MLP 8 d^2 per token of either stream,
                                                         Q K^T and A V, img_mod and txt_mod 6 d^2 each)
        out   = 2 d^2 + N d p^2 C_out                    (norm_out's adaLN, proj_out)
        F     = 2 (embed + B block + out)                (FLOP = 2 multiply-adds)

    Every block runs both streams (the last block's text output is computed, then discarded). At Qwen-Image
    (REFERENCE_CONFIG), 512 px (16 x 64 x 64 latents, N = 1024), L = 32 this is 15.2 TFLOP (FLUX.1-dev at
    L = 512: 21.5)."""
    c, h, w = latent_shape
    if h % 2 or w % 2 or text_len < 1:
        raise ValueError(f"latents {latent_shape} must have even H and W (2x2 packing), text_len={text_len} >= 1")
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, c_in = config.get("patch_size", 2), config["in_channels"]
    if c_in != 4 * c:
        raise ValueError(f"in_channels={c_in} must be 4 x the latent channels {c}")
    n, el = (h // 2) * (w // 2), text_len
    s = n + el
    c_out = config.get("out_channels") or c_in
    macs = n * c_in * d + el * config["joint_attention_dim"] * d + 256 * d + d * d
    macs += config["num_layers"] * (12 * s * d * d + 2 * s * s * d + 12 * d * d)
    macs += 2 * d * d + n * d * p * p * c_out
    return 2 * macs


@dataclass(frozen=True)
class MemoryEstimate:
    """Device bytes of LoRA training (see training_memory_estimate)."""

    params: int
    weights: int
    lora: int
    block_inputs: int
    block_recompute: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.block_inputs + self.block_recompute + self.workspace


ACTIVATIONS_PER_TOKEN = 22  # d-wide tensors a block keeps per token for backward (MLP hidden 4d counted twice)


def training_memory_estimate(config: dict = REFERENCE_CONFIG, latent_shape=(16, 64, 64), text_len: int = 64,
                             rows: int = 18, lora_rank: int = 32, checkpointing: bool = True,
                             weight_bytes: int = 2) -> MemoryEstimate:
    """An estimate (not a measurement) of the device memory of the training phase with LoRA on the 8 attention
    projections of every block: the frozen weights (params x weight_bytes; parameters counted on the meta
    device), both adapters in float32 with the trained one's gradient and AdamW moments (20 bytes per adapter
    parameter), the block inputs of `rows` policy rows kept by checkpointing ((N + L) d per block and row, in the
    weights' dtype) or, without checkpointing, every block's activations, one block's recomputed activations
    (ACTIVATIONS_PER_TOKEN x (N + L) d per row) and 2 GiB of workspace. rows = train.micro_batch x
    train.num_timesteps (the policy call's rows; the no-grad [reference; ema] call keeps no activations)."""
    model = meta_transformer(TRANSFORMER_CLASS, config)
    params = parameter_count(model)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"]
    tokens = latent_shape[1] * latent_shape[2] // 4 + text_len
    lora_params = blocks * 8 * lora_rank * (d + d)
    per_block = rows * tokens * d * weight_bytes
    block = ACTIVATIONS_PER_TOKEN * per_block
    return MemoryEstimate(params=params, weights=params * weight_bytes, lora=20 * lora_params,
                          block_inputs=blocks * per_block if checkpointing else blocks * block,
                          block_recompute=block if checkpointing else 0, workspace=2 * 2**30)
