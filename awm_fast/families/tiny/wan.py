"""A tiny random-weight Wan text-to-video pipeline built locally (no download), for tests and smoke runs.

The real classes with tiny configs: WanTransformer3DModel (2 blocks, 2 heads of 12), a UMT5EncoderModel of width
32 with the character-vocabulary T5 tokenizer of tiny/__init__.py, an AutoencoderKLWan with Wan 2.1's compression
(temporal 4, spatial 8: `temperal_downsample` (False, True, True) over four levels) and its latents_mean /
latents_std (the class defaults), and the scheduler of Wan2.1-T2V-*-Diffusers: UniPCMultistepScheduler with
flow sigmas, flow_prediction and flow_shift 3 (the 480p value). Saved with `save_pretrained`, so loading it runs
the code that loads the real weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

TEXT_DIM = 32
LATENT_CHANNELS = 16


def tiny_wan_transformer_config() -> dict:
    """The tiny transformer: inner dim 24 (2 heads x 12; rope splits 12 into t/h/w = 4/4/4), 2 blocks."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=LATENT_CHANNELS,
                out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_tiny_wan(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny WanPipeline to `path` and return it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from awm_fast.families.tiny import _t5_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_ff=64, num_layers=1,
                                               num_heads=2, d_kv=16, pad_token_id=0, eos_token_id=1)).eval()
    transformer = WanTransformer3DModel(**tiny_wan_transformer_config())
    vae = AutoencoderKLWan(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path)
    return path
