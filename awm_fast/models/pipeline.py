"""What the diffusers families (sd3, flux) share: loading a pipeline, encoding every prompt once (cached on disk),
the VAE decoder and the scheduler's time grid.

    decode(z) = clamp(vae.decode(z / scaling + shift) / 2 + 1/2, 0, 1)
    prompt cache: cache_root()/prompt_embeds/<sha256(model path | t5 tokens)>/<sha256(prompt)>.pt (atomic writes)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from awm_fast.logs import progress_bar

from awm_fast.config import Config, cache_root
from awm_fast.env import hub_offline
from awm_fast.models.policy import Conditioning

logger = logging.getLogger(__name__)


def from_pretrained(pipeline_cls, family: str, path: str, dtype: torch.dtype):
    """A diffusers pipeline from a local folder or the hub cache; one clear line when it is missing."""
    local_only = os.path.isdir(path) or hub_offline()
    absent = {}  # components saved as null (e.g. SD3 without T5) must be passed as None explicitly
    index = Path(path) / "model_index.json"
    if index.is_file():
        absent = {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only the first
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            return pipeline_cls.from_pretrained(path, torch_dtype=dtype, local_files_only=local_only, **absent)
    except (OSError, ValueError) as exc:
        where = "the folder" if os.path.isdir(path) else "the hub id (no network or not in the local cache)"
        raise FileNotFoundError(f"cannot load {family} weights from model.path={path!r} via {where}: "
                                f"{str(exc).splitlines()[0]}") from None


def prompt_cache_dir(model_path: str, text_tokens: int) -> Path:
    where = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    return cache_root() / "prompt_embeds" / hashlib.sha256(f"{where}|t5={text_tokens}".encode()).hexdigest()[:16]


@torch.no_grad()
def encode_all(encode_batch, prompts: list[str], cache_dir: Path, batch: int = 32) -> dict[str, Conditioning]:
    """Encode every distinct prompt once with encode_batch(list) -> (embeds, pooled) or a Conditioning with a
    token mask (each prompt is then kept at its own length; Conditioning.cat pads); cached in memory and on
    disk (one file per prompt, keyed by model + prompt, written atomically)."""
    cache: dict[str, Conditioning] = {}
    todo = []
    for p in dict.fromkeys(prompts):
        file = cache_dir / f"{hashlib.sha256(p.encode()).hexdigest()}.pt"
        if file.is_file():
            saved = torch.load(file)
            cache[p] = Conditioning(saved["embeds"], saved["pooled"], saved.get("mask"))
        else:
            todo.append(p)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for start in progress_bar(range(0, len(todo), batch), desc="encode prompts", unit="batch", leave=False):
        chunk = todo[start:start + batch]
        encoded = encode_batch(chunk)
        for i, p in enumerate(chunk):
            cache[p] = _one_prompt(encoded, i)
            tmp = cache_dir / f".{os.getpid()}.tmp"
            torch.save({"embeds": cache[p].embeds, "pooled": cache[p].pooled, "mask": cache[p].mask}, tmp)
            os.replace(tmp, cache_dir / f"{hashlib.sha256(p.encode()).hexdigest()}.pt")
    return cache


def _one_prompt(encoded, i: int) -> Conditioning:
    """Row i of encode_batch's output, (embeds, pooled) or a Conditioning; padding tokens (mask False) cut off."""
    c = encoded if isinstance(encoded, Conditioning) else Conditioning(*encoded)
    embeds, pooled = c.embeds[i:i + 1].cpu(), c.pooled[i:i + 1].cpu()
    if c.mask is None:
        return Conditioning(embeds, pooled)
    length = int(c.mask[i].sum())
    return Conditioning(embeds[:, :length], pooled, torch.ones(1, length, dtype=torch.bool))


def make_encoder(cache: dict[str, Conditioning], device: torch.device):
    def encode(batch_prompts: list[str]) -> Conditioning:
        missing = [p for p in batch_prompts if p not in cache]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} was not encoded up front (the text encoders are released)")
        return Conditioning.cat([cache[p] for p in batch_prompts]).to(device)

    return encode


class VaeDecoder:
    """latents -> images in [0, 1]: x = vae.decode(z / scaling + shift), in batches of `batch`.
    `speed_up()` (model.vae_compile on CUDA, families.load): the VAE's 4-D weights and the latents in
    channels_last (cuDNN's NHWC convolutions) and the decoder compiled (one graph per batch shape)."""

    def __init__(self, vae, batch: int = 16) -> None:
        vae.requires_grad_(False)
        self.vae, self.batch, self.fast = vae, batch, False

    def speed_up(self, backend: str = "inductor") -> None:
        self.vae.to(memory_format=torch.channels_last)
        self.vae.decoder.compile(backend=backend)
        self.fast = True

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae, out = self.vae, []
        for z in latents.split(self.batch):
            z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            if self.fast:
                z = z.contiguous(memory_format=torch.channels_last)
            out.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


def make_decoder(vae, batch: int = 16) -> VaeDecoder:
    return VaeDecoder(vae, batch)


def meta_transformer(class_name: str, config: dict) -> torch.nn.Module:
    """The diffusers model `class_name` of `config` built on the meta device (no memory, no init): for parameter
    and LoRA counts of the real architectures (memory estimates, FLOP tables)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lora_parameter_count(model: torch.nn.Module, targets, rank: int) -> int:
    """Parameters of one LoRA adapter of `rank` on the nn.Linear modules matching `targets` (peft's rule: the
    module name equals a target or ends with "." + target)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
