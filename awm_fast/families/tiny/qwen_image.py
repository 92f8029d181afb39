"""A tiny random-weight QwenImagePipeline built locally (no download), for tests and `awm-fast tiny-qwen_image`.

The real classes with tiny configs: QwenImageTransformer2DModel (2 dual-stream blocks), AutoencoderKLQwenImage
(the Wan-style causal 3D VAE, 4 latent channels, spatial scale 2, non-trivial latents_mean / latents_std),
Qwen2_5_VLForConditionalGeneration (2 text layers, 1 vision layer never used) and a Qwen2Tokenizer whose byte-level
BPE vocabulary is the 256 byte symbols plus the words of the pipeline's prompt template, so that the template's
system prefix is exactly `prompt_template_encode_start_idx` = 34 tokens, as with the real tokenizer, and the
pipeline's drop of those leading tokens keeps the prompt and the assistant suffix. The scheduler has
Qwen/Qwen-Image's config (exponential dynamic shift between sequence lengths 256 and 8192, shifts 0.5 / 0.9,
terminal sigma 0.02).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

LATENT_CHANNELS = 4
TEXT_DIM = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                            shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def _template_words(template: str) -> list[str]:
    """The template's words as the byte-level pre-tokenizer sees them (a leading space becomes 'Ġ')."""
    text = template.replace("{}", " ")
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "\n")
    return sorted({w.replace(" ", "\u0120") for w in re.findall(r" ?[A-Za-z]+", text)})


def qwen_tokenizer(template: str):
    """A Qwen2Tokenizer: byte-level BPE over the 256 byte symbols, with chained merges that make each template
    word one token (any other text still tokenizes, byte by byte where no merge applies)."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in _template_words(template):
        for end in range(2, len(word) + 1):
            pair = (word[:end - 1], word[end - 1])
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append(pair)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=2048)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]], special_tokens=True)
    return tok


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim, vocab_size = TEXT_DIM // 2, len(tokenizer)
    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
               eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size, rope_theta=1e6,
                         rope_scaling={"type": "default", "rope_type": "default",
                                       "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}, **ids),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM),
        hidden_size=TEXT_DIM, vocab_size=vocab_size, **ids,
        # vision tokens beyond the vocabulary: prompts never contain them
        vision_start_token_id=vocab_size + 1, vision_end_token_id=vocab_size + 2, vision_token_id=vocab_size + 3,
        image_token_id=vocab_size + 4, video_token_id=vocab_size + 5)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny QwenImagePipeline to `path` (16 px images -> 4 x 8 x 8 latents -> 16 packed tokens)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    path = Path(path)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT_CHANNELS,
                                              out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False],
                                 latents_mean=(0.3 * torch.randn(LATENT_CHANNELS, generator=gen)).tolist(),
                                 latents_std=(1 + torch.rand(LATENT_CHANNELS, generator=gen)).tolist())
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                             text_encoder=None, tokenizer=None, transformer=transformer)
    tokenizer = qwen_tokenizer(pipe.prompt_template_encode)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n_prefix = len(tokenizer(prefix).input_ids)
    if n_prefix != pipe.prompt_template_encode_start_idx:
        raise ValueError(f"the tiny tokenizer splits the template prefix into {n_prefix} tokens, the pipeline drops "
                         f"{pipe.prompt_template_encode_start_idx}")
    pipe.tokenizer, pipe.text_encoder = tokenizer, _text_encoder(tokenizer)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=pipe.text_encoder)
    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(path)
    return path
