"""Tiny random-weight SD3 and FLUX pipelines built locally (no download), for tests and smoke runs.

The pipeline uses the real diffusers/transformers classes (SD3Transformer2DModel, AutoencoderKL, two
CLIPTextModelWithProjection encoders with CLIPTokenizers built from a small character vocabulary, no T5:
SD3 then feeds zeros for the T5 part) and is saved with `save_pretrained`, so loading it exercises exactly
the code that loads SD3.5 weights.
"""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch

CLIP_DIMS = (16, 24)  # hidden sizes of the two CLIP text encoders -> pooled 40, joint 24 padded to 32
JOINT_DIM = 32
LATENT_CHANNELS = 16


def _write_clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer whose vocabulary is single characters (with and without the word-end mark)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + "\".,'!?-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)


def build_tiny_sd3(path: str | Path, *, sample_size: int = 8, seed: int = 0) -> Path:
    """Write a tiny StableDiffusion3Pipeline to `path` (images of 2 * sample_size pixels) and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tok_dir = path / "_tokenizer_src"
    _write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    encoders = []
    for dim in CLIP_DIMS:
        cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, projection_dim=dim,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        encoders.append(CLIPTextModelWithProjection(cfg).eval())
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=LATENT_CHANNELS,
                                        out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                        caption_projection_dim=32, pooled_projection_dim=sum(CLIP_DIMS),
                                        pos_embed_max_size=sample_size * 2, qk_norm="rms_norm",
                                        dual_attention_layers=(0,))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    shutil.rmtree(tok_dir)
    return path


def _t5_tokenizer():
    """A T5 tokenizer over a small unigram vocabulary of characters and word-initial letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + "\"',.!?-"]
    pieces += [("\u2581" + c, -1.0) for c in string.ascii_lowercase] + [("\u2581", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def build_tiny_flux(path: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny FluxPipeline (CLIP + T5 encoders, 16-channel VAE of scale 2) to `path`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tok_dir = path / "_tokenizer_src"
    _write_clip_tokenizer(tok_dir)
    clip_tok = CLIPTokenizer.from_pretrained(tok_dir)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    t5_tok = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=JOINT_DIM, d_ff=64, num_layers=1, num_heads=2,
                                 d_kv=16, pad_token_id=0, eos_token_id=1)).eval()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=JOINT_DIM, pooled_projection_dim=16,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(path)
    shutil.rmtree(tok_dir)
    return path
