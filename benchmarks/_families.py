"""Every diffusers family's transformer call and VAE decode at a preset's real shapes, on the meta device, for the
FLOP table (benchmarks/family_flops.py) and the activation memory (benchmarks/activation_memory.py).

    MetaCall(class_name, config, call, x, cond)   the policy's transformer call as the family's build_policy makes
                                                  it (its `call` and conditioning shapes: text tokens x the text
                                                  width, pooled or (1, 0), no token mask)
    vae_decode_flops(cfg)                         FlopCounterMode of one sample's VAE decode, counted on meta

The VAEs: SD3.5 and FLUX.1 the SD3-shaped AutoencoderKL (benchmarks/_models.py; FLUX.1's only differs in its
latent scale and shift), Z-Image FLUX.1's AutoencoderKL (its pipeline's 16-channel AE), FLUX.2 AutoencoderKLFlux2,
Qwen-Image AutoencoderKLQwenImage and Wan AutoencoderKLWan at their diffusers default configs (the released VAEs'
shapes), decoding one image (one video for Wan) of the preset's resolution.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from awm_fast.config import Config
from awm_fast.families import pipeline_family
from awm_fast.models.policy import Conditioning
from benchmarks import _meta, _models

META = _meta.META
TEXT_WIDTH = {"z_image": "cap_feat_dim", "wan": "text_dim"}  # the text width's config key (others: joint_attention_dim)
POOLED = {"sd3": "pooled_projection_dim", "flux": "pooled_projection_dim"}  # families with a pooled text embedding


@dataclass
class MetaCall:
    class_name: str
    config: dict
    call: Callable | None  # call(transformer, x, t, cond) -> v; None: the SD3 call of FlowPolicy
    latent: tuple[int, ...]
    text_len: int
    text_width: int
    pooled_width: int

    def inputs(self, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """x, t and the conditioning of `rows` rows, on the meta device."""
        x = torch.randn(rows, *self.latent, device=META)
        t = torch.full((rows,), 0.5, device=META)
        cond = Conditioning(torch.randn(rows, self.text_len, self.text_width, device=META),
                            torch.randn(rows, self.pooled_width, device=META))
        return x, t, cond


def _call(kind: str, cfg: Config, config: dict) -> Callable | None:
    if kind == "sd3":
        return None
    if kind == "flux":
        from awm_fast.families.flux import flux_call

        return functools.partial(flux_call, guidance=cfg.model.guidance)
    if kind == "wan":
        from awm_fast.families.wan import wan_call

        return functools.partial(wan_call, expand_timesteps=bool(config.get("expand_timesteps", False)))
    module = pipeline_family(kind)
    return getattr(module, f"{kind}_call")


def meta_call(cfg: Config, class_name: str, config: dict, latent: tuple[int, ...], text_len: int) -> MetaCall:
    """The policy call of preset `cfg` for the transformer `class_name(**config)` (module docstring)."""
    kind = cfg.model.kind
    width = config[TEXT_WIDTH.get(kind, "joint_attention_dim")]
    pooled = config[POOLED[kind]] if kind in POOLED else 0
    return MetaCall(class_name, config, _call(kind, cfg, config), latent, text_len, width, pooled)


def policy_flops(cfg: Config, mc: MetaCall) -> dict:
    """FLOPs of one row's policy call with the preset's LoRA (rank, alpha, targets) without grad, and of its
    backward (benchmarks/_meta.forward_backward_flops), on the meta device. No checkpointing: model FLOPs."""
    from benchmarks._official import PeftSwitchedPolicy

    m = cfg.model
    with _meta.quiet_diffusers():
        model = _meta.meta_lora_model(mc.class_name, mc.config, rank=m.lora_rank, alpha=m.lora_alpha,
                                      targets=m.lora_targets)
    policy = PeftSwitchedPolicy(model, None, None, mc.latent, _meta.POLICY_DEVICE, torch.float32, call=mc.call)
    x, t, cond = mc.inputs()
    return _meta.forward_backward_flops(lambda: policy.velocity(x, t, cond))


def _vae(cfg: Config):
    """(VAE module on meta, the latent it decodes for one sample of the preset)."""
    import diffusers

    kind, side = cfg.model.kind, cfg.model.resolution // 8
    with torch.device(META), _meta.quiet_diffusers():
        if kind in ("sd3", "flux", "z_image"):
            config = _models.SD3_VAE_CONFIG if kind == "sd3" else _models.FLUX_VAE_CONFIG
            return diffusers.AutoencoderKL(**config), (1, 16, side, side)
        if kind == "flux2":
            vae = diffusers.AutoencoderKLFlux2()
            return vae, (1, vae.config.latent_channels, side, side)
        if kind == "qwen_image":
            return diffusers.AutoencoderKLQwenImage(), (1, 16, 1, side, side)
        if kind == "wan":
            from awm_fast.families.wan import latent_frames

            return diffusers.AutoencoderKLWan(), (1, 16, latent_frames(cfg.model.frames), side, side)
    raise ValueError(f"model.kind={kind!r} has no VAE here")


@functools.lru_cache(maxsize=None)
def _vae_decode_flops(kind: str, resolution: int, frames: int) -> int:
    cfg = Config()
    cfg.model.kind, cfg.model.resolution, cfg.model.frames = kind, resolution, frames
    vae, latent = _vae(cfg)
    vae.eval().requires_grad_(False)
    z = torch.randn(*latent, device=META)
    return _meta.forward_flops(lambda: vae.decode(z, return_dict=False)[0])


def vae_decode_flops(cfg: Config) -> int:
    """FLOPs of decoding one sample of preset `cfg` (module docstring), counted on the meta device."""
    return _vae_decode_flops(cfg.model.kind, cfg.model.resolution, cfg.model.frames)
