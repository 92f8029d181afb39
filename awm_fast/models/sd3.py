"""SD3 / SD3.5 from a diffusers folder or hub id: transformer with LoRA, text encoders, VAE.

Prompts are encoded with the pipeline's three text encoders (CLIP-L, CLIP-G, T5 with model.text_tokens
tokens, 128 as the official RL code); latents are 16 x (res / f) x (res / f), f = the VAE's scale factor (8 for SD3.5); decode = VAE decode to [0, 1].
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from awm_fast.algo.timesteps import scheduler_grid
from awm_fast.config import Config, cache_root
from awm_fast.models.policy import Conditioning, FlowPolicy



def from_pretrained(pipeline_cls, family: str, path: str, dtype: torch.dtype):
    """A diffusers pipeline from a local folder or the hub cache; one clear line when it is missing."""
    local_only = os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE") == "1"
    absent = {}  # components saved as null (e.g. SD3 without T5) must be passed as None explicitly
    index = Path(path) / "model_index.json"
    if index.is_file():
        absent = {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}
    try:
        return pipeline_cls.from_pretrained(path, torch_dtype=dtype, local_files_only=local_only, **absent)
    except (OSError, ValueError) as exc:
        where = "the folder" if os.path.isdir(path) else "the hub id (no network or not in the local cache)"
        raise FileNotFoundError(f"cannot load {family} weights from model.path={path!r} via {where}: "
                                f"{str(exc).splitlines()[0]}") from None


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import StableDiffusion3Pipeline

    return from_pretrained(StableDiffusion3Pipeline, "SD3", path, dtype)


def prompt_cache_dir(model_path: str, text_tokens: int) -> Path:
    where = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    return cache_root() / "prompt_embeds" / hashlib.sha256(f"{where}|t5={text_tokens}".encode()).hexdigest()[:16]


@torch.no_grad()
def encode_all(encode_batch, prompts: list[str], cache_dir: Path, batch: int = 32) -> dict[str, Conditioning]:
    """Encode every distinct prompt once with encode_batch(list) -> (embeds, pooled); cached in memory and on
    disk (one file per prompt, keyed by model + prompt, written atomically)."""
    cache: dict[str, Conditioning] = {}
    todo = []
    for p in dict.fromkeys(prompts):
        file = cache_dir / f"{hashlib.sha256(p.encode()).hexdigest()}.pt"
        if file.is_file():
            saved = torch.load(file)
            cache[p] = Conditioning(saved["embeds"], saved["pooled"])
        else:
            todo.append(p)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(todo), batch), desc="encode prompts", unit="batch", leave=False, disable=None):
        chunk = todo[start:start + batch]
        embeds, pooled = encode_batch(chunk)
        for i, p in enumerate(chunk):
            cache[p] = Conditioning(embeds[i:i + 1].cpu(), pooled[i:i + 1].cpu())
            tmp = cache_dir / f".{os.getpid()}.tmp"
            torch.save({"embeds": cache[p].embeds, "pooled": cache[p].pooled}, tmp)
            os.replace(tmp, cache_dir / f"{hashlib.sha256(p.encode()).hexdigest()}.pt")
    return cache


def make_encoder(cache: dict[str, Conditioning], device: torch.device):
    def encode(batch_prompts: list[str]) -> Conditioning:
        missing = [p for p in batch_prompts if p not in cache]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} was not encoded up front (the text encoders are released)")
        c = Conditioning.cat([cache[p] for p in batch_prompts])
        return Conditioning(c.embeds.to(device), c.pooled.to(device))

    return encode


def make_decoder(vae, batch: int = 16):
    """latents -> images in [0, 1]: x = vae.decode(z / scaling + shift), in batches."""
    vae.requires_grad_(False)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        out = []
        for z in latents.split(batch):
            z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            out.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    return decode


def pipeline_sigmas(scheduler, cfg: Config, image_seq_len: int | None = None, log=print):
    """sigmas(N) of the pipeline's own scheduler (algo.timesteps.scheduler_grid); says when sample.shift, which
    then only shifts the continuous training timesteps, differs from the scheduler's shift."""
    shift = scheduler.config.get("shift", 1.0)
    if not scheduler.config.get("use_dynamic_shifting", False) and shift != cfg.sample.shift:
        log(f"[grid] the rollout grid is the scheduler's (shift {shift}); sample.shift={cfg.sample.shift} only "
            "shifts the uniform / logit_normal training timesteps")
    return functools.partial(scheduler_grid, scheduler, image_seq_len=image_seq_len)


def load_sd3_policy(cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str], log=print) -> FlowPolicy:
    """All `prompts` (and "") are encoded up front; the text encoders are then released. The time grid is the
    pipeline scheduler's."""
    from awm_fast.models.load import freeze_and_adapt

    pipe = load_pipeline(cfg.model.path, dtype)
    side = cfg.model.resolution // pipe.vae_scale_factor
    transformer = freeze_and_adapt(pipe.transformer, cfg, device, dtype, log=log)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).to(device)

    def encode_batch(chunk: list[str]):
        embeds, _, pooled, _ = pipe.encode_prompt(chunk, chunk, chunk, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=cfg.model.text_tokens)
        return embeds, pooled

    cache = encode_all(encode_batch, list(prompts) + [""], prompt_cache_dir(cfg.model.path, cfg.model.text_tokens))
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # free their memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return FlowPolicy(transformer, make_encoder(cache, device), make_decoder(pipe.vae.to(device)),
                      (transformer.config.in_channels, side, side), device, dtype,
                      sigmas=pipeline_sigmas(pipe.scheduler, cfg, log=log))
