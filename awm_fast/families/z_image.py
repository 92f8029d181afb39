"""Z-Image (Tongyi-MAI Z-Image-Turbo, Z-Image) from a diffusers folder or hub id: ZImagePipeline's conventions
turned into the trainer's.

    latents    (B, 16, H, W) as the pipeline samples them, H = W = 2 (resolution // (2 f)), f = the VAE's scale
               factor (8); the transformer takes a list of (16, F=1, H, W) and patchifies 2x2 itself.
    captions   the Qwen3 text encoder's second-to-last hidden states of each prompt's real tokens (chat template
               applied, at most model.text_tokens tokens), one (L_b, D) tensor per prompt: cached per prompt at its
               own length, a batch right-padded with a token mask (Conditioning.cat), cut back to the list here.
               Inside, each sample's image and caption tokens are padded to multiples of 32 (pad tokens the model
               attends to), the batch to its longest [image; caption] sequence (masked): rows stay rows, so LoRA
               routing per batch row (models.routing) holds in every block.
    timestep   the pipeline passes (1000 - 1000 sigma) / 1000 = 1 - t and negates the output, so
                   v(x, t, c) = eps - x0 = -f(x, 1 - t, c)     (t = sigma, x_t = (1 - t) x0 + t eps)
    grid       set_timesteps(sigmas=linspace(1, 1/N, N), mu) with the scheduler's own shift (Turbo: static
               shift 3, mu unused; mu from (H/2)(W/2) only under dynamic shifting).
    guidance   no guidance embedding. The pipeline's CFG is pred = pos + w (pos - neg), on when w > 0 (Turbo: w = 0,
               off); the trainer's is v = v_u + w' (v_c - v_u), the same for w' = w + 1 (sample.guidance_scale =
               the pipeline's guidance_scale + 1; 1 = off), with "" as the negative prompt as the pipeline's
               default. Not implemented: cfg_normalization (rescaling pred to at most k |pos|) and cfg_truncation
               (CFG off where 1 - t > the threshold), both off by the pipeline's defaults.
    decode     vae.decode(z / scaling + shift) / 2 + 1/2, clamped (pipeline.make_decoder).

Attention goes through diffusers' dispatch; batches of prompts of different lengths carry an attention mask, so
the backends without one (FlashAttention-3 in diffusers, PyTorch's flash SDPA) are refused and flash2 maps to
diffusers' flash_varlen. sample.cuda_graphs is refused: the caption lengths are data a captured graph would freeze.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from awm_fast.config import Config
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.attention import DIFFUSERS_BACKENDS, resolve_attention_backend
from awm_fast.models.pipeline import (encode_all, from_pretrained, lora_parameter_count, make_decoder, make_encoder,
                                      meta_transformer, parameter_count, prompt_cache_dir)
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import pipeline_sigmas

TRANSFORMER_CLASS, LORA_LOADER = "ZImageTransformer2DModel", "ZImageLoraLoaderMixin"
LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
SEQ_MULTIPLE = 32  # the transformer pads each sample's image and caption tokens to a multiple of this
# why sample.cuda_graphs cannot serve this family (models.fast_path: auto leaves them off)
CUDA_GRAPHS_REFUSED = "its transformer reads the caption lengths on the host, which a captured graph would freeze"
# Our names -> diffusers' dispatch names, for backends that take the attention mask of padded batches.
MASKLESS_BACKENDS = ("flash3", "sdpa_flash")
MASKED_DIFFUSERS_BACKENDS = {**{k: v for k, v in DIFFUSERS_BACKENDS.items() if k not in MASKLESS_BACKENDS},
                             "flash2": "flash_varlen"}
# Z-Image-Turbo's transformer/config.json (as transcribed in the stored public code of several projects loading
# it; diffusers' ZImageTransformer2DModel defaults differ only in axes_lens[0], 1024).
REFERENCE_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
TEXT_ENCODER_PARAMS = 4.02e9  # Qwen3-4B (36 layers, hidden 2560), resident only while the prompts are encoded


def caption_list(cond: Conditioning) -> list[torch.Tensor]:
    """The transformer's caption features: row b's tokens where the (right-padded) mask is True."""
    if cond.mask is None:
        return list(cond.embeds.unbind(0))
    lengths = cond.mask.sum(1).tolist()  # one host sync per call
    return [e[:n] for e, n in zip(cond.embeds.unbind(0), lengths)]


def padded_conditioning(captions: list[torch.Tensor]) -> Conditioning:
    """A list of (L_b, D) caption features -> (B, max L, D) right-padded with zeros, the token mask, pooled (B, 0)."""
    lengths = [c.shape[0] for c in captions]
    embeds = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True)
    positions = torch.arange(embeds.shape[1], device=embeds.device)
    mask = positions[None] < torch.tensor(lengths, device=embeds.device)[:, None]
    return Conditioning(embeds, embeds.new_zeros(len(captions), 0), mask)


def z_image_call(transformer, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """v(x, t, c) = -f([x_b as (C, 1, H, W)], 1 - t, [caption_b]) for (B, C, H, W) latents, t in [0, 1] (float32)."""
    out = transformer(list(x.unsqueeze(2).unbind(0)), 1 - t, caption_list(cond), return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def set_z_image_attention(transformer, backend: str) -> None:
    if backend in MASKLESS_BACKENDS:
        raise ValueError(f"model.attention_backend={backend} takes no attention mask, which Z-Image batches of prompts "
                         "of different lengths need (and diffusers' flash3 has no backward): use flash2, sdpa_cudnn, "
                         "sdpa_efficient or auto")
    transformer.set_attention_backend(MASKED_DIFFUSERS_BACKENDS[backend])


def check_lora_targets(transformer, targets) -> None:
    """Every target names a module (a suffix after a dot, as peft matches it); the default SD3 attn.* names do not."""
    names = [name for name, _ in transformer.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"model.lora_targets {missing} name no module of {type(transformer).__name__}; its attention "
                         f"projections are model.lora_targets=[{','.join(LORA_TARGETS)}] (preset geneval_z_image)")


def latent_side(resolution: int, vae_scale_factor: int) -> int:
    """The pipeline's latent side: 2 (resolution // (2 f)), resolution divisible by 2 f."""
    if resolution % (2 * vae_scale_factor):
        raise ValueError(f"model.resolution={resolution} must be a multiple of {2 * vae_scale_factor} for Z-Image "
                         f"(the VAE's factor {vae_scale_factor} times the 2x2 patches)")
    return 2 * (resolution // (2 * vae_scale_factor))


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import ZImagePipeline

    return from_pretrained(ZImagePipeline, "Z-Image", path, dtype)


def build_tiny(path):
    from awm_fast.families.tiny.z_image import build_tiny_z_image

    return build_tiny_z_image(path)


def build_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy:
    """All `prompts` (and "") are encoded up front with the pipeline's encode_prompt; the text encoder is then
    released. The time grid is the pipeline scheduler's, set as ZImagePipeline sets it."""
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    if cfg.sample.cuda_graphs is True and device.type == "cuda":  # auto: off here (models.fast_path)
        raise ValueError(f"sample.cuda_graphs=true is not supported for model.kind=z_image: {CUDA_GRAPHS_REFUSED}")
    pipe = load_pipeline(cfg.model.path, dtype)
    side = latent_side(cfg.model.resolution, pipe.vae_scale_factor)
    if cfg.train.finetune == "lora":
        check_lora_targets(pipe.transformer, cfg.model.lora_targets)
    backend = resolve_attention_backend(cfg.model.attention_backend, device, dtype, skip=MASKLESS_BACKENDS)
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype,
                                   attention=lambda m: set_z_image_attention(m, backend))
    pipe.text_encoder.requires_grad_(False).to(device)

    def encode_batch(chunk: list[str]) -> Conditioning:
        # a copy: _encode_prompt writes the chat-templated text into the list it is given
        embeds, _ = pipe.encode_prompt(list(chunk), device=device, do_classifier_free_guidance=False,
                                       max_sequence_length=cfg.model.text_tokens)
        return padded_conditioning(embeds)

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    grid = pipeline_sigmas(pipe.scheduler, cfg, image_seq_len=(side // 2) ** 2)
    return FlowPolicy(transformer, make_encoder(cache, device), make_decoder(pipe.vae.to(device)),
                      (transformer.config.in_channels, side, side), device, dtype, call=z_image_call,
                      sigmas=functools.partial(grid, input_sigmas=get_default_z_image_sigmas))


def _ceil(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def forward_flops(config: dict, latent_shape: tuple[int, int, int], text_len: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one ZImageTransformer2DModel forward for one sample of (C, H, W)
    latents and text_len caption tokens. With p the patch, d = dim, h = int(d / 3 * 8) the SwiGLU width, J =
    cap_feat_dim, a = min(d, 256) the adaLN width, R refiner layers per stream, B main layers,
    N = ceil32((H/p)(W/p)) image tokens and L = ceil32(text_len) caption tokens (the padding is computed too),
    S = N + L:

        embed  = 256 * 1024 + 1024 a  +  N (p^2 C) d  +  L J d         (timestep MLP, patch and caption embedders)
        block(n, mod) = 4 n d^2 + 3 n d h + 2 n^2 d + mod 4 a d        (q/k/v/out, SwiGLU, QK^T and AV, adaLN)
        out    = a d + S d (p^2 C)                                     (final adaLN, projection of every token)
        F_fwd  = 2 (embed + R block(N, 1) + R block(L, 0) + B block(S, 1) + out)

    At Z-Image-Turbo, 512 px (16 x 64 x 64 latents: N = 1024) this is 18.5 TFLOP per sample at L = 512 (the
    preset's text_tokens, the longest caption), 12.9 at L = 64 (a short GenEval prompt)."""
    c, hgt, wid = latent_shape
    p = config["all_patch_size"][0]
    if hgt % p or wid % p or text_len < 1:
        raise ValueError(f"latent {hgt}x{wid} must be divisible by patch {p}, text_len={text_len} must be >= 1")
    d, a = config["dim"], min(config["dim"], 256)
    h = int(d / 3 * 8)
    n, el = _ceil((hgt // p) * (wid // p)), _ceil(text_len)
    s, patch = n + el, p * p * config.get("all_f_patch_size", (1,))[0] * c

    def block(tokens: int, modulated: bool) -> int:
        return 4 * tokens * d * d + 3 * tokens * d * h + 2 * tokens * tokens * d + (4 * a * d if modulated else 0)

    refiners = config["n_refiner_layers"]
    macs = 256 * 1024 + 1024 * a + n * patch * d + el * config["cap_feat_dim"] * d
    macs += refiners * (block(n, True) + block(el, False)) + config["n_layers"] * block(s, True)
    macs += a * d + s * d * patch
    return 2 * macs


@dataclass(frozen=True)
class MemoryEstimate:
    """Device memory of LoRA training (bytes), an estimate to decide whether to try, not a measurement."""

    params: int  # transformer parameters
    lora_params: int  # one adapter's
    weights: int  # the frozen transformer in bf16
    lora: int  # both adapters (float32) + the trained one's gradient and AdamW moments
    saved_inputs: int  # checkpointed blocks' inputs for the micro-batch's rows (hidden states bf16, rope float32)
    block_peak: int  # the largest transient: one block's activations over the shared batch's no-grad
    # [reference; ema] call (twice the rows; the grad rows' recompute in backward is half that)
    workspace: int
    encode_phase: int  # while the prompts are encoded: the transformer and the bf16 Qwen3-4B text encoder

    @property
    def train_phase(self) -> int:
        return self.weights + self.lora + self.saved_inputs + self.block_peak + self.workspace

    @property
    def peak(self) -> int:
        return max(self.train_phase, self.encode_phase)


def training_memory(config: dict = REFERENCE_CONFIG, latent_shape=(16, 64, 64), text_len: int = 512, rows: int = 18,
                    lora_rank: int = 32, targets=LORA_TARGETS) -> MemoryEstimate:
    """bf16 weights (2 bytes / parameter, counted on the meta device), LoRA of `lora_rank` on `targets` (20 bytes per
    LoRA parameter: two float32 adapters, gradient, two moments), and with gradient checkpointing per grad row: each
    block's input (2 d bytes per token + the 4 (d / heads) bytes of its float32 rope factors); one block's
    activations, about 28 d + 8 h bytes per token (q/k/v/out and norms in bf16, the float32 rope copies of q and k,
    SwiGLU's three h-wide tensors), over the 2 x rows of the shared batch's frozen call; 2 GiB of workspace.
    Defaults: the preset (512 px, 512 text tokens, micro-batch 3 x 6 timesteps = 18 rows)."""
    model = meta_transformer(TRANSFORMER_CLASS, config)
    params, lora = parameter_count(model), lora_parameter_count(model, targets, lora_rank)
    c, hgt, wid = latent_shape
    p, d, heads = config["all_patch_size"][0], config["dim"], config["n_heads"]
    h = int(d / 3 * 8)
    n, el = _ceil((hgt // p) * (wid // p)), _ceil(text_len)
    per_token = 2 * d + 4 * (d // heads)
    r = config["n_refiner_layers"]
    saved = rows * per_token * (r * (n + el) + config["n_layers"] * (n + el))
    activations = (28 * d + 8 * h) * (n + el)
    return MemoryEstimate(params=params, lora_params=lora, weights=2 * params, lora=20 * lora, saved_inputs=saved,
                          block_peak=2 * rows * activations, workspace=2 * 2**30,
                          encode_phase=2 * params + int(2 * TEXT_ENCODER_PARAMS))
