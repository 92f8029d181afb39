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
torch.utils.flop_counter.FlopCounterMode on the meta device, as is the forward (a check of the formula):
benchmarks/_flops.py (at SD3.5-M, 512 px: F_bwd = 2.52 TFLOP = 1.13 F_fwd per row). Model FLOPs per
trained image = T (3 F_fwd + F_bwd): policy, reference and EMA forwards and the policy backward (the shared
batch runs the same work in two calls: the policy rows with grad, the [reference; ema] rows in one no-grad call).

FLUX.1-dev-shaped: diffusers' FluxTransformer2DModel with the real architecture config (19 double-stream and 38
single-stream blocks, 24 x 128 heads, joint dim 4096, pooled 768, guidance embedding, rope axes 16/56/56); 512 px
-> 16x64x64 latents, packed 2x2 (awm_fast.families.flux) into N = 1024 tokens of 64 channels; L = 512 T5 tokens
(the FLUX.1-dev preset's model.text_tokens); guidance 3.5, no CFG. With S = N + L, C/Co = packed in/out channels,
B double blocks, B1 single blocks, g = 1 with the guidance embedding:

    embed  = N C d  +  L J d  +  (1 + g)(256 d + d^2)  +  P d + d^2       (x, context, time [+ guidance], pooled)
    double = 4 S d^2 + 8 S d^2 + 2 S^2 d + 12 d^2                          (q/k/v/out and MLP 4d of both streams,
                                                                          attention, adaLN-Zero 6 d^2 x 2)
    single = 3 S d^2 + 4 S d^2 + 5 S d^2 + 2 S^2 d + 3 d^2                 (q/k/v, MLP in, proj_out over [attn; MLP],
                                                                          attention, adaLN 3 d^2)
    out    = 2 d^2 + N d Co                                                (final adaLN, projection)
    F_fwd  = 2 (embed + B double + B1 single + out)

At FLUX.1-dev, 512 px, L = 512 this is 21.5 TFLOP per image (~9.7x SD3.5-M). Its phases train with activation
checkpointing of the blocks (as the FLUX presets do), so the training backward also recomputes each block's
forward (counted by FlopCounterMode in F_bwd).

The FLUX VAE has the SD3 VAE's architecture (16 latent channels, blocks 128/256/512/512, no quant convs); only
its latent scaling (0.3611) and shift (0.1159) differ, which cost nothing.
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
FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY_FLUX_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
FLUX_VAE_CONFIG = {**SD3_VAE_CONFIG, "shift_factor": 0.1159, "scaling_factor": 0.3611}  # SD3's shapes
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                       shift_factor=0.0609, scaling_factor=1.5305)
TINY_FLUX_VAE_CONFIG = {**TINY_VAE_CONFIG, "shift_factor": 0.1159, "scaling_factor": 0.3611}
MODELS = ("sd35m", "flux")


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
    kind: str = "sd3"  # "sd3": SD3Transformer2DModel; "flux": FluxTransformer2DModel (packed latents, flux_call)
    guidance: float = 3.5  # FLUX guidance-embedding value (model.guidance of the presets); unused for SD3
    gradient_checkpointing: bool = False  # train.gradient_checkpointing of the presets (FLUX: on, for memory)
    preset: str = "geneval_sd35m"  # the preset whose workload this is (`--phases preset`: the phases it uses)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def preset_phases(self, phases: tuple[str, ...]) -> tuple[str, ...]:
        """`phases` less those the preset does not run: rollout_cfg unless its sample.guidance_scale != 1."""
        from awm_fast.config import load_config

        cfg_on = load_config(self.preset).sample.guidance_scale != 1.0
        return tuple(p for p in phases if p != "rollout_cfg" or cfg_on)


def model_spec(size: str, model: str = "sd35m") -> ModelSpec:
    """`model` "sd35m" or "flux"; `size` "full"/"quick": the real shape at 512 px; "cpu": tiny model, 16x16x16
    latents; "tiny": 16x8x8, 4 steps. FLUX: guidance embedding 3.5, no CFG, checkpointed blocks (the FLUX.1-dev
    preset, awm_fast/configs/geneval_flux_dev.yaml)."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not one of {', '.join(MODELS)}")
    flux = model == "flux"
    kw = dict(kind="flux", guidance_scale=1.0, gradient_checkpointing=True, preset="geneval_flux_dev") if flux else {}
    if size in ("full", "quick"):
        if flux:
            return ModelSpec("flux1dev-512px", FLUX_DEV_CONFIG, FLUX_VAE_CONFIG, (16, 64, 64), 512, **kw)
        return ModelSpec("sd35m-512px", SD35M_CONFIG, SD3_VAE_CONFIG, (16, 64, 64), 205)
    name, cfg, vae = ("tiny-flux-cpu", TINY_FLUX_CONFIG, TINY_FLUX_VAE_CONFIG) if flux else \
        ("tiny-mmdit-cpu", TINY_CONFIG, TINY_VAE_CONFIG)
    if size == "cpu":
        return ModelSpec(name, cfg, vae, (16, 16, 16), 24, lora_rank=4, **kw)
    if size == "tiny":
        return ModelSpec(name, cfg, vae, (16, 8, 8), 8, rollout_batch=2, micro_batch=1, num_timesteps=2, num_steps=4,
                         lora_rank=4, cpu_reps=2, **kw)
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


def flux_forward_flops(cfg: dict, latent_hw: tuple[int, int], text_len: int) -> int:
    """Matmul FLOPs of one FluxTransformer2DModel forward for one image of (C/4, H, W) latents, packed 2x2
    (formula in the module docstring)."""
    p, d = cfg.get("patch_size", 1), cfg["num_attention_heads"] * cfg["attention_head_dim"]
    h, w = latent_hw
    if h % 2 or w % 2 or text_len < 1:
        raise ValueError(f"latent {h}x{w} must be even (FLUX packs 2x2 patches), text_len={text_len} must be >= 1")
    n, el = (h // 2) * (w // 2), text_len
    s = n + el
    c_in = cfg["in_channels"]
    c_out = cfg.get("out_channels") or c_in
    g = 1 if cfg.get("guidance_embeds") else 0
    macs = n * c_in * d + el * cfg["joint_attention_dim"] * d
    macs += (1 + g) * (256 * d + d * d) + cfg["pooled_projection_dim"] * d + d * d
    macs += cfg["num_layers"] * (12 * s * d * d + 2 * s * s * d + 12 * d * d)
    macs += cfg["num_single_layers"] * (12 * s * d * d + 2 * s * s * d + 3 * d * d)
    macs += 2 * d * d + n * d * p * p * c_out
    return 2 * macs


def forward_flops(spec: ModelSpec) -> int:
    """The forward FLOPs per image of the spec's transformer (MMDiT or FLUX formula)."""
    fn = flux_forward_flops if spec.kind == "flux" else mmdit_forward_flops
    return fn(spec.transformer, spec.latent[1:], spec.text_len)


def transformer_class(spec: ModelSpec):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return FluxTransformer2DModel if spec.kind == "flux" else SD3Transformer2DModel


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the spec's transformer (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = transformer_class(spec)(**spec.transformer)
    return sum(p.numel() for p in model.parameters())


def phase_memory_estimate(spec: ModelSpec) -> dict:
    """Rough device memory the phases need at the largest variant (bytes): the float32 weights (the baseline's,
    and every variant's build before its cast), the float32 block inputs that checkpointed training keeps for the
    micro-batch's rows (with no checkpointing, ~16 tensors of the token stream per block instead), one block's
    recomputed activations, and 2 GiB of workspace. An estimate to decide whether to try, not a measurement."""
    params = parameter_count(spec)
    cfg = spec.transformer
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = spec.latent[1] * spec.latent[2] // (4 if spec.kind == "flux" else cfg["patch_size"] ** 2) + spec.text_len
    blocks = cfg["num_layers"] + cfg.get("num_single_layers", 0)
    per_block = 1 if spec.gradient_checkpointing else 16
    rows = spec.micro_batch * spec.num_timesteps
    activations = rows * tokens * d * 4 * (per_block * blocks + 16)
    weights = 4 * params
    return {"params": params, "weights_fp32_bytes": weights, "activation_bytes": activations,
            "total_bytes": weights + activations + 2 * 2**30}


def count_flops(fn) -> int:
    """Total FLOPs torch.utils.flop_counter.FlopCounterMode sees while fn() runs (forward and any backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def build_transformer(spec: ModelSpec, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random-weight SD3Transformer2DModel or FluxTransformer2DModel (by spec), initialised in float32 directly
    on `device` from `seed` (the same weights on every call), then cast to `dtype`."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # FLUX's .to() warns about modules "kept in float32" (there are none)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformer_class(spec)(**spec.transformer)
        return model.to(dtype).eval().requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(level)


def build_vae(spec: ModelSpec, device: torch.device, seed: int = 0):
    """Random-weight SD3-shaped AutoencoderKL (the FLUX VAE has the same shapes; decoder used), float32."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**spec.vae)
    return vae.eval().requires_grad_(False)
