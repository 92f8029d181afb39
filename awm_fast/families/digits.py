"""The digits family (model.kind=digits): the embedded task's tiny SD3Transformer2DModel (same class as SD3.5),
pretrained here on scikit-learn's bundled 8x8 digit images (no download) with flow matching,

    x_t = (1 - t) x0 + t eps,  loss = mean (v(x_t, t, c) - (eps - x0))^2,  t ~ U(0, 1),

deliberately under-trained so that it draws the prompted digit only part of the time. Its "text encoder" is a
fixed, seeded table of token and pooled embeddings per digit (index 10 = the empty prompt); latents are the
images themselves. The task around it (the classifier that rewards a sample, the evaluation prompts) is
awm_fast.tasks.digits.

The base model and the table are produced with fixed seeds and cached on disk under
`cache_root()/digits/base-<key>/`. Building them draws from a forked RNG (`own_rng`): the process's global random
state afterwards is the same whether the cache was empty or not, so a run on an empty cache computes what the same
run on a warm one does (the trainer seeds the LoRA initialisation before building the task).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from awm_fast.config import DigitsConfig, cache_root
from awm_fast.logs import progress_bar

logger = logging.getLogger(__name__)

TEXT_LEN, TEXT_DIM, POOLED_DIM = 2, 32, 32
NULL_PROMPT = ""
PROMPTS = [str(d) for d in range(10)]


def tiny_transformer_config() -> dict:
    """0.43M parameters: 3 joint blocks of 4 heads x 16, 2x2 patches over the 8x8 image."""
    return dict(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=3, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=64,
                pooled_projection_dim=POOLED_DIM, pos_embed_max_size=8)


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 8, 8) images scaled to [-1, 1] and (N,) labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def split_indices(n: int, held_out: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(n * (1 - held_out))
    return perm[:cut], perm[cut:]


class DigitsTextEncoder:
    """Fixed embedding table: prompt "d" -> row d, "" -> row 10."""

    def __init__(self, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        self.embeds, self.pooled = embeds, pooled

    @classmethod
    def seeded(cls, seed: int = 0) -> "DigitsTextEncoder":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(11, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(11, POOLED_DIM, generator=g))

    def index(self, prompts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([10 if p == NULL_PROMPT else PROMPTS.index(p) for p in prompts])
        except ValueError:
            bad = next(p for p in prompts if p != NULL_PROMPT and p not in PROMPTS)
            raise ValueError(f"digits prompt {bad!r} is not one of {PROMPTS} or the empty prompt") from None

    def __call__(self, prompts: list[str]):
        from awm_fast.models.policy import Conditioning

        idx = self.index(prompts)
        return Conditioning(self.embeds[idx], self.pooled[idx])


@dataclass
class DigitsBase:
    model_dir: Path  # diffusers save_pretrained folder of the base transformer
    text_encoder: DigitsTextEncoder


@contextlib.contextmanager
def own_rng(seed: int):
    """A block whose global (CPU) torch RNG is seeded with `seed` and restored afterwards (torch.random.fork_rng):
    module initialisations inside it draw the same numbers every time and leave the caller's random state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cached_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """`folder`, filled first by `fill(tmp)` (which writes done.json last) in a temporary sibling renamed into
    place, when it has no done.json yet: a crashed build never leaves a folder that looks complete. Builders of
    one folder take turns on an flock of `<folder>.lock`: a second process (a test worker, a torchrun rank) waits
    for the first one's build and reads it instead of building it again."""
    if (folder / "done.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # no flock (Windows): concurrent builders each build, the last rename wins
            pass
        if not (folder / "done.json").is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            fill(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder


def pretrain_base_model(cfg: DigitsConfig, text: DigitsTextEncoder, seed: int = 0):
    """Flow-matching pretraining of the tiny transformer with 10% empty prompts (for optional CFG)."""
    with own_rng(seed):
        return _pretrain_base_model(cfg, text, seed)


def _pretrain_base_model(cfg: DigitsConfig, text: DigitsTextEncoder, seed: int):
    from diffusers import SD3Transformer2DModel

    g = torch.Generator().manual_seed(seed)
    model = SD3Transformer2DModel(**tiny_transformer_config())
    images, labels = load_digit_images()
    train_idx, _ = split_indices(len(images))
    images, labels = images[train_idx], labels[train_idx]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    for _ in progress_bar(range(cfg.pretrain_steps), desc="pretrain base model", unit="step", leave=False):
        idx = torch.randint(0, len(images), (cfg.pretrain_batch,), generator=g)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(len(y), generator=g) < 0.1, torch.full_like(y, 10), y)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(len(y), generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        v = model(hidden_states=xt, encoder_hidden_states=text.embeds[y], pooled_projections=text.pooled[y],
                  timestep=t * 1000, return_dict=False)[0]
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def _base_key(cfg: DigitsConfig) -> str:
    blob = json.dumps({"model": tiny_transformer_config(), "pretrain_steps": cfg.pretrain_steps,
                       "pretrain_batch": cfg.pretrain_batch, "pretrain_lr": cfg.pretrain_lr, "version": 2},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_base_model(cfg: DigitsConfig) -> DigitsBase:
    """The cached base model and embedding table, or produce them (fixed seeds) and cache them atomically."""
    folder = cache_root() / "digits" / f"base-{_base_key(cfg)}"

    def fill(tmp: Path) -> None:
        logger.info(f"[digits] pretraining the base model (cached afterwards in {folder})")
        text = DigitsTextEncoder.seeded()
        pretrain_base_model(cfg, text).save_pretrained(tmp / "transformer")
        torch.save({"embeds": text.embeds, "pooled": text.pooled}, tmp / "text_encoder.pt")
        (tmp / "done.json").write_text(json.dumps({"pretrain_steps": cfg.pretrain_steps}, indent=2))

    cached_folder(folder, fill)
    table = torch.load(folder / "text_encoder.pt", weights_only=True)
    return DigitsBase(folder / "transformer", DigitsTextEncoder(table["embeds"], table["pooled"]))


def decode_digits(latents: torch.Tensor) -> torch.Tensor:
    """Latents are the images themselves: [-1, 1] -> [0, 1]."""
    return ((latents.float() + 1) / 2).clamp(0, 1)


def digits_policy(cfg, device: torch.device, dtype: torch.dtype, base: DigitsBase):
    """The policy of the base model in `base.model_dir`: LoRA (or full fine-tuning) on the tiny SD3 transformer,
    the fixed embedding table as prompt encoder, latents = images, the SD3 grid shifted by sample.shift."""
    import functools

    from diffusers import SD3Transformer2DModel

    from awm_fast.models.adapt import freeze_and_adapt
    from awm_fast.models.policy import Conditioning, FlowPolicy
    from awm_fast.sampling.timesteps import sd3_grid

    text = base.text_encoder

    def encode(prompts: list[str]) -> Conditioning:
        c = text(prompts)
        return Conditioning(c.embeds.to(device), c.pooled.to(device))

    transformer = freeze_and_adapt(SD3Transformer2DModel.from_pretrained(base.model_dir), cfg, device, dtype)
    return FlowPolicy(transformer, encode, decode_digits, (1, 8, 8), device, dtype,
                      sigmas=functools.partial(sd3_grid, shift=cfg.sample.shift))


def load_digits_policy(cfg, device: torch.device, base: DigitsBase):
    """`digits_policy` of `base` in model.dtype, finished as every family's policy (families.load.finish_policy:
    full fine-tuning's copies, CUDA graphs)."""
    from awm_fast.env import DTYPES
    from awm_fast.families.load import finish_policy

    return finish_policy(digits_policy(cfg, device, DTYPES[cfg.model.dtype], base), cfg, device)


def build_policy(cfg, device: torch.device, dtype: torch.dtype, prompts: list[str]):
    """The family interface (awm_fast.families): the prepared (cached) base model's policy; every digits prompt
    is encodable, so `prompts` needs no encoding up front."""
    return digits_policy(cfg, device, dtype, prepare_base_model(cfg.digits))
