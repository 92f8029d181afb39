"""Model families: model.kind -> the module that builds its policy.

Each family module defines

    build_policy(cfg, device, dtype, prompts) -> FlowPolicy

(the transformer made trainable with models.adapt.freeze_and_adapt, its prompt encoder with every prompt of
`prompts` encodable, its decoder and its scheduler's time grid); families.load.load_policy adds what every
family shares (full fine-tuning's model copies, CUDA graphs). A family with a diffusers pipeline (every one
but digits) also defines

    load_pipeline(path, dtype) -> the diffusers pipeline (hub id or local folder)
    build_tiny(path) -> path   a tiny random-weight pipeline saved there (tests, `awm-fast tiny-<kind>`)
    TRANSFORMER_CLASS, LORA_LOADER   the diffusers transformer class name and the LoRA loader mixin
                                     (diffusers.loaders) whose format `pipeline.load_lora_weights` reads
and, when CUDA graphs cannot replay its transformer calls, CUDA_GRAPHS_REFUSED: why (`fast_path`).

Adding a family is one module in this package, its entry here and a preset (awm_fast/configs/). The table names
modules instead of importing them: config validates model.kind against its keys without loading diffusers.
`fast_path` resolves the fast-path switches (models.fast_path) with the family's CUDA_GRAPHS_REFUSED.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from awm_fast.config import Config
    from awm_fast.models.fast_path import FastPath
    from awm_fast.models.policy import FlowPolicy

FAMILIES = {
    "digits": "awm_fast.families.digits",  # the embedded task's tiny SD3 transformer, pretrained on digits (CPU)
    "sd3": "awm_fast.families.sd3",  # SD3 / SD3.5 diffusers pipelines
    "flux": "awm_fast.families.flux",  # FLUX.1 diffusers pipelines
    "qwen_image": "awm_fast.families.qwen_image",  # Qwen-Image diffusers pipelines (20B MMDiT, Qwen2.5-VL text encoder)
    "z_image": "awm_fast.families.z_image",  # Z-Image(-Turbo) diffusers pipelines (6B single-stream DiT)
    "flux2": "awm_fast.families.flux2",  # FLUX.2 [klein] diffusers pipelines (4B / 9B, distilled or base)
    "wan": "awm_fast.families.wan",  # Wan 2.1 / 2.2 text-to-video (one transformer) diffusers pipelines
}
MODEL_KINDS = tuple(FAMILIES)
PIPELINE_KINDS = tuple(k for k in FAMILIES if k != "digits")  # the families loaded from a diffusers pipeline


class PolicyFamily(Protocol):
    def build_policy(self, cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str]) -> FlowPolicy: ...


class PipelineFamily(PolicyFamily, Protocol):
    TRANSFORMER_CLASS: str
    LORA_LOADER: str

    def load_pipeline(self, path: str, dtype: torch.dtype): ...

    def build_tiny(self, path: str | Path) -> Path: ...


def policy_family(kind: str) -> PolicyFamily:
    """The module of model.kind=`kind`."""
    if kind not in FAMILIES:
        raise ValueError(f"model.kind={kind!r} is not one of {MODEL_KINDS}")
    return importlib.import_module(FAMILIES[kind])


def pipeline_family(kind: str) -> PipelineFamily:
    """The module of a family with a diffusers pipeline (model.kind != digits)."""
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"model.kind={kind!r} has no diffusers pipeline; these do: {PIPELINE_KINDS}")
    return importlib.import_module(FAMILIES[kind])


def family_of_transformer(transformer) -> PipelineFamily:
    """The pipeline family whose TRANSFORMER_CLASS `transformer` is (FSDP2's wrapper class name accepted);
    SD3 for any other (the digits task's SD3 transformer)."""
    name = type(transformer).__name__.removeprefix("FSDP")
    for kind in PIPELINE_KINDS:
        family = pipeline_family(kind)
        if family.TRANSFORMER_CLASS == name:
            return family
    return pipeline_family("sd3")


def fast_path(cfg: Config, device: torch.device | str) -> FastPath:
    """models.fast_path.fast_path with model.kind's family asked why it cannot replay CUDA graphs (its module's
    CUDA_GRAPHS_REFUSED; the module is imported only when auto needs the answer)."""
    from awm_fast.models import fast_path as switches

    return switches.fast_path(cfg, device, family_refusal=lambda: _graphs_refused(cfg.model.kind))


def resolve_fast_path(cfg: Config, device: torch.device | str) -> Config:
    """models.fast_path.resolve_fast_path with model.kind's family asked (`fast_path`)."""
    from awm_fast.models import fast_path as switches

    return switches.resolve_fast_path(cfg, device, family_refusal=lambda: _graphs_refused(cfg.model.kind))


def _graphs_refused(kind: str) -> str | None:
    return getattr(policy_family(kind), "CUDA_GRAPHS_REFUSED", None)
