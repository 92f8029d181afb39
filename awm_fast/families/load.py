"""Build the policy of a config: the model family (awm_fast.families: model.kind -> its module's
`build_policy`) loads the transformer, prompt encoder and decoder; then what every family shares: for full
fine-tuning (train.finetune=full) the trained transformer and its frozen reference and EMA copies instead of
adapters (models.adapt.make_full_models), and with sample.cuda_graphs the replayed no-grad calls."""
from __future__ import annotations

import logging

import torch

from awm_fast.config import Config
from awm_fast.env import DTYPES
from awm_fast.families import fast_path, policy_family
from awm_fast.models.adapt import make_full_models
from awm_fast.models.cuda_graphs import VelocityGraphs
from awm_fast.models.finetune import FULL, get_finetune
from awm_fast.models.merged_lora import MergedLora
from awm_fast.models.policy import FlowPolicy

logger = logging.getLogger(__name__)


def load_policy(cfg: Config, device: torch.device, *, prompts: list[str] = ()) -> FlowPolicy:
    """digits: the cached tiny base model; sd3/flux: a diffusers folder/hub id, encoding `prompts` up front."""
    policy = policy_family(cfg.model.kind).build_policy(cfg, device, DTYPES[cfg.model.dtype], list(prompts))
    return finish_policy(policy, cfg, device)


def finish_policy(policy: FlowPolicy, cfg: Config, device: torch.device) -> FlowPolicy:
    """train.finetune's strategy (models.finetune: LoRA as built, or full fine-tuning's model copies); with
    sample.cuda_graphs the no-grad transformer calls replay CUDA graphs (models.cuda_graphs)."""
    policy.finetune = get_finetune(cfg.train.finetune)
    if policy.finetune is FULL:
        policy = make_full_models(policy, cfg)
    if cfg.model.merged_lora:
        policy.merged = MergedLora(policy.transformer)
        logger.info(f"[merged lora] no-grad calls on merged weight copies ({policy.merged.nbytes() / 2**30:.2f} GiB)")
    if cfg.model.vae_compile and device.type == "cuda" and hasattr(policy.decode, "speed_up"):
        policy.decode.speed_up()
    path = fast_path(cfg, device)
    if path.cuda_graphs:
        if device.type == "cuda":
            policy.graphs = VelocityGraphs(policy.forward)
        else:
            logger.warning(f"[cuda graphs] off: sample.cuda_graphs needs a CUDA device, this run is on {device.type}")
    if device.type == "cuda":
        logger.info(f"[fast path] {path.summary()}")
    return policy
