"""A loaded transformer made trainable: the frozen base with its attention backend and LoRA adapters
(train.finetune=lora), or the trained / reference / EMA transformers of full fine-tuning (train.finetune=full).

Every model family calls `freeze_and_adapt` on its transformer; `make_full_models` runs after the family built
the policy (families.load.load_policy)."""
from __future__ import annotations

import copy
import logging

import torch

from awm_fast.config import Config
from awm_fast.models.attention import resolve_attention_backend, use_attention_backend
from awm_fast.models.compile import compile_blocks
from awm_fast.models.fast_path import family_not_asked, fast_path
from awm_fast.models.finetune import FULL
from awm_fast.models.fp8 import check_fp8, convert_to_fp8
from awm_fast.models.lora import EMA, POLICY, add_adapters
from awm_fast.models.policy import FlowPolicy
from awm_fast.models.routing import enable_checkpointing

logger = logging.getLogger(__name__)


def freeze_and_adapt(transformer, cfg: Config, device: torch.device, dtype: torch.dtype, attention=None):
    """Frozen base in `dtype` on `device`, the attention backend (`attention(transformer)`, default: our SD3
    processor), "default" + "ema" LoRA in float32."""
    transformer.requires_grad_(False)
    transformer.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if attention is None:
        use_attention_backend(transformer, resolve_attention_backend(cfg.model.attention_backend, device, dtype))
    else:
        attention(transformer)
    m = cfg.model
    if cfg.train.finetune == "full":
        return transformer
    add_adapters(transformer, rank=m.lora_rank, alpha=m.lora_alpha, init=m.lora_init, targets=m.lora_targets)
    for name, p in transformer.named_parameters():  # LoRA weights train in float32
        if "lora_" in name:
            p.data = p.data.float()
    if m.fp8:  # after the LoRA (float32, untouched): the frozen block projections in float8 (models.fp8)
        check_fp8(device)
        logger.info(f"[fp8] {convert_to_fp8(transformer)} frozen block projections in float8 (e4m3, per-row "
                    f"dynamic activation scales{'' if device.type == 'cuda' else '; CPU: emulated'})")
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(transformer)
    if fast_path(cfg, device, family_refusal=family_not_asked).compile:
        blocks = compile_blocks(transformer, mode=m.compile_mode, backend=m.compile_backend)
        logger.info(f"[compile] {blocks} transformer blocks compiled (mode {m.compile_mode}, backend "
                    f"{m.compile_backend}); the first step compiles them")
    return transformer


def make_full_models(policy: FlowPolicy, cfg: Config) -> FlowPolicy:
    """Full fine-tuning: the loaded transformer (model.dtype, frozen) becomes the reference; a copy of it in the
    same dtype the EMA (KL anchor, moved after each step); a float32 copy the trained model (master weights;
    under autocast when model.dtype is a half type). policy.transformer = the trained model; policy.finetune =
    models.finetune.FULL."""
    reference = policy.transformer
    ema = copy.deepcopy(reference)
    trained = copy.deepcopy(reference).float().requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(trained)
    m = cfg.model
    if fast_path(cfg, policy.device, family_refusal=family_not_asked).compile:
        for module in (trained, reference, ema):
            blocks = compile_blocks(module, mode=m.compile_mode, backend=m.compile_backend)
        logger.info(f"[compile] {blocks} blocks of each of the trained, reference and EMA transformers compiled (mode "
                    f"{m.compile_mode}, backend {m.compile_backend}); the first step compiles them")
    policy.transformer, policy.models = trained, {POLICY: trained, None: reference, EMA: ema}
    policy.finetune = FULL
    return policy
