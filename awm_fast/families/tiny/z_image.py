"""A tiny random-weight Z-Image pipeline built locally (no download), for tests and smoke runs.

The real diffusers/transformers classes with tiny configs: ZImageTransformer2DModel (2 layers, 1 refiner layer
per stream, d = 32, 2 heads of 16 = rope axes 8 + 4 + 4), a Qwen3Model text encoder (hidden size = the
transformer's cap_feat_dim) with a byte-level Qwen2Tokenizer over the 256 byte symbols and a chat template of
Qwen's turn markup (what ZImagePipeline._encode_prompt applies), the FLUX-style 16-channel AutoencoderKL of
scale 2 and Z-Image-Turbo's scheduler (static shift 3). Saved with `save_pretrained`, so loading it runs the code
that loads Z-Image-Turbo.
"""
from __future__ import annotations

from pathlib import Path

import torch

LATENT_CHANNELS = 16
CAPTION_DIM = 32  # Qwen3 hidden size = the transformer's cap_feat_dim
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, turn start, turn end
# One user turn, then the assistant turn opened (add_generation_prompt); enable_thinking=False would add an empty
# think block, as Qwen3's template does. ZImagePipeline calls it with enable_thinking=True.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
TINY_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=2,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                        cap_feat_dim=CAPTION_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                        axes_lens=[1024, 64, 64])


def qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer without merges: one token per UTF-8 byte, plus the special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + symbols)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_z_image(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ZImagePipeline to `path` and return it (images of 4k pixels, k >= 1: latents 2k x 2k)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=CAPTION_DIM, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=1024,
                                          pad_token_id=tokenizer.pad_token_id)).eval()
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    with torch.no_grad():  # diffusers initialises the pad tokens to zero; random ones make the padding visible
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)  # the FLUX VAE's latent scaling and shift
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(path)
    return path
