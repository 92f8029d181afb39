"""Model families: model.kind -> the module that builds its policy.

Each family module defines

    build_policy(cfg, device, dtype, prompts) -> FlowPolicy

(the transformer made trainable with models.adapt.freeze_and_adapt, its prompt encoder with every prompt of
`prompts` encodable, its decoder and its scheduler's time grid); models.load.load_policy adds what every
family shares (full fine-tuning's model copies, CUDA graphs). A family with a diffusers pipeline (every one
but digits) also defines

    load_pipeline(path, dtype) -> the diffusers pipeline (hub id or local folder)
    build_tiny(path) -> path   a tiny random-weight pipeline saved there (tests, `awm-fast tiny-<kind>`)
    TRANSFORMER_CLASS, LORA_LOADER   the diffusers transformer class name and the LoRA loader mixin
                                     (diffusers.loaders) whose format `pipeline.load_lora_weights` reads
and, when CUDA graphs cannot replay its transformer calls, CUDA_GRAPHS_REFUSED: why (models.fast_path).

Adding a family is one module plus its entry here. The table names modules instead of importing them: config
validates model.kind against its keys without loading diffusers, and no package below the families (models/)
imports the one above (tasks/).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from awm_fast.config import Config
    from awm_fast.models.policy import FlowPolicy

FAMILIES = {
    "digits": "awm_fast.tasks.digits",  # the embedded task's tiny SD3 transformer (CPU)
    "sd3": "awm_fast.models.sd3",  # SD3 / SD3.5 diffusers pipelines
    "flux": "awm_fast.models.flux",  # FLUX.1 diffusers pipelines
    "qwen_image": "awm_fast.models.qwen_image",  # Qwen-Image diffusers pipelines (20B MMDiT, Qwen2.5-VL text encoder)
    "z_image": "awm_fast.models.z_image",  # Z-Image(-Turbo) diffusers pipelines (6B single-stream DiT)
    "flux2": "awm_fast.models.flux2",  # FLUX.2 [klein] diffusers pipelines (4B / 9B, distilled or base)
    "wan": "awm_fast.models.wan",  # Wan 2.1 / 2.2 text-to-video (one transformer) diffusers pipelines
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
