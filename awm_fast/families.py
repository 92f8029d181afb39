"""Model families: model.kind -> the module that builds its policy.

Each family module defines

    build_policy(cfg, device, dtype, prompts, log) -> FlowPolicy

(the transformer made trainable with models.adapt.freeze_and_adapt, its prompt encoder with every prompt of
`prompts` encodable, its decoder and its scheduler's time grid); models.load.load_policy adds what every
family shares (full fine-tuning's model copies, CUDA graphs). Adding a family is one module plus its entry here.
The table names modules instead of importing them: config validates model.kind against its keys without
loading diffusers, and no package below the families (models/) imports the one above (tasks/).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from awm_fast.config import Config
    from awm_fast.models.policy import FlowPolicy

FAMILIES = {
    "digits": "awm_fast.tasks.digits",  # the embedded task's tiny SD3 transformer (CPU)
    "sd3": "awm_fast.models.sd3",  # SD3 / SD3.5 diffusers pipelines
    "flux": "awm_fast.models.flux",  # FLUX.1 diffusers pipelines
}
MODEL_KINDS = tuple(FAMILIES)


class PolicyFamily(Protocol):
    def build_policy(self, cfg: Config, device: torch.device, dtype: torch.dtype, prompts: list[str],
                     log: Callable[[str], None]) -> FlowPolicy: ...


def policy_family(kind: str) -> PolicyFamily:
    """The module of model.kind=`kind`."""
    if kind not in FAMILIES:
        raise ValueError(f"model.kind={kind!r} is not one of {MODEL_KINDS}")
    return importlib.import_module(FAMILIES[kind])
