"""A tiny random-weight FLUX.2 [klein] pipeline built locally (no download), for tests and smoke runs.

The real classes with tiny configs: Flux2Transformer2DModel (1 double-stream + 1 single-stream block, 2 x 16
heads, 4 rope axes of 4), AutoencoderKLFlux2 (scale 2, 4 latent channels -> 16 patchified, its batch-norm
statistics set to random values so the de-normalisation before decode is exercised), a Qwen3ForCausalLM text
encoder of 27 layers (the pipeline stacks hidden states 9, 18 and 27: joint dim 3 x 16 = 48) and a Qwen2
byte-level BPE tokenizer over the 256 byte symbols (no merges) with a Qwen-style chat template. FLUX.1-dev's
dynamically shifted scheduler, as diffusers' FLUX.2 conversion script pairs with every FLUX.2 model. Saved with
`save_pretrained`, so loading it runs exactly the code that loads FLUX.2-klein-4B.
"""
from __future__ import annotations

from pathlib import Path

import torch

LATENT_CHANNELS = 4  # the VAE's; the transformer sees 4 x 4 = 16 patchified channels (the real model: 32 -> 128)
TEXT_HIDDEN = 16
TEXT_LAYERS = 27  # the pipeline's default text_encoder_out_layers are (9, 18, 27)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
                        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                        guidance_embeds=False)


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE maps bytes to (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def qwen_tokenizer():
    """A Qwen2 tokenizer (the class Flux2KleinPipeline expects) whose vocabulary is the 256 byte symbols plus the
    chat special tokens: any text tokenizes, one token per UTF-8 byte."""
    from transformers import Qwen2TokenizerFast

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], chat_template=CHAT_TEMPLATE,
                             additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.model_max_length = 512
    return tok


def build_tiny_flux2(path: str | Path, *, seed: int = 0, is_distilled: bool = True) -> Path:
    """Write a tiny Flux2KleinPipeline to `path` (images of 2 x latent side pixels) and return it;
    `is_distilled` as FLUX.2-klein-4B (no CFG) or False as the klein base models (true CFG)."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                             use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
    pipe.save_pretrained(path)
    return path
