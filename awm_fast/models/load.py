"""Build the policy (transformer + LoRA adapters + prompt encoder + decoder) for a config; for full fine-tuning
(train.finetune=full) the trained transformer and its frozen reference and EMA copies instead of adapters."""
from __future__ import annotations

import copy
import functools

import torch

from awm_fast.algo.timesteps import sd3_grid
from awm_fast.config import Config
from awm_fast.models.attention import resolve_attention_backend, use_attention_backend
from awm_fast.models.compile import compile_blocks
from awm_fast.models.cuda_graphs import VelocityGraphs
from awm_fast.models.lora import EMA, POLICY, add_adapters
from awm_fast.models.policy import FlowPolicy
from awm_fast.models.routing import enable_checkpointing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, option: str = "run.device") -> torch.device:
    """"auto" -> cuda when torch sees one, else cpu; `option` names the setting in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}=cuda but torch sees no CUDA device (use {option}=cpu or auto)")
    return torch.device(name)


def freeze_and_adapt(transformer, cfg: Config, device: torch.device, dtype: torch.dtype, log=print, attention=None):
    """Frozen base in `dtype` on `device`, the attention backend (`attention(transformer)`, default: our SD3
    processor), "default" + "ema" LoRA in float32."""
    transformer.requires_grad_(False)
    transformer.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if attention is None:
        use_attention_backend(transformer, resolve_attention_backend(cfg.model.attention_backend, device, dtype, log=log))
    else:
        attention(transformer)
    m = cfg.model
    if cfg.train.finetune == "full":
        return transformer
    add_adapters(transformer, rank=m.lora_rank, alpha=m.lora_alpha, init=m.lora_init, targets=m.lora_targets)
    for name, p in transformer.named_parameters():  # LoRA weights train in float32
        if "lora_" in name:
            p.data = p.data.float()
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(transformer)
    if m.compile:
        blocks = compile_blocks(transformer, mode=m.compile_mode, backend=m.compile_backend)
        log(f"[compile] {blocks} transformer blocks compiled (mode {m.compile_mode}, backend {m.compile_backend}); "
            "the first step compiles them")
    return transformer


def make_full_models(policy: FlowPolicy, cfg: Config, log=print) -> FlowPolicy:
    """Full fine-tuning: the loaded transformer (model.dtype, frozen) becomes the reference; a copy of it in the
    same dtype the EMA (KL anchor, moved after each step); a float32 copy the trained model (master weights;
    under autocast when model.dtype is a half type). policy.transformer = the trained model."""
    reference = policy.transformer
    ema = copy.deepcopy(reference)
    trained = copy.deepcopy(reference).float().requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(trained)
    m = cfg.model
    if m.compile:
        for module in (trained, reference, ema):
            blocks = compile_blocks(module, mode=m.compile_mode, backend=m.compile_backend)
        log(f"[compile] {blocks} blocks of each of the trained, reference and EMA transformers compiled (mode "
            f"{m.compile_mode}, backend {m.compile_backend}); the first step compiles them")
    policy.transformer, policy.models = trained, {POLICY: trained, None: reference, EMA: ema}
    return policy


def load_policy(cfg: Config, device: torch.device, *, digits_artifacts=None, prompts: list[str] = (),
                log=print) -> FlowPolicy:
    """digits: the cached tiny base model; sd3/flux: a diffusers folder/hub id, encoding `prompts` up front.
    With sample.cuda_graphs the no-grad transformer calls replay CUDA graphs (models.cuda_graphs)."""
    policy = _build_policy(cfg, device, digits_artifacts, list(prompts))
    if cfg.train.finetune == "full":
        policy = make_full_models(policy, cfg, log)
    if cfg.sample.cuda_graphs:
        if device.type == "cuda":
            policy.graphs = VelocityGraphs(policy.forward)
            log("[cuda graphs] no-grad transformer calls (rollout steps) replay CUDA graphs")
        else:
            log(f"[cuda graphs] off: sample.cuda_graphs needs a CUDA device, this run is on {device.type}")
    return policy


def _build_policy(cfg: Config, device: torch.device, digits_artifacts, prompts: list[str]) -> FlowPolicy:
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.kind == "digits":
        from diffusers import SD3Transformer2DModel

        from awm_fast.tasks.digits import decode_digits

        if digits_artifacts is None:
            raise ValueError("model.kind=digits needs the prepared digits artifacts")
        transformer = SD3Transformer2DModel.from_pretrained(digits_artifacts.model_dir)
        text = digits_artifacts.text_encoder

        def encode(prompts: list[str]):
            c = text(prompts)
            return type(c)(c.embeds.to(device), c.pooled.to(device))

        transformer = freeze_and_adapt(transformer, cfg, device, dtype)
        return FlowPolicy(transformer, encode, decode_digits, (1, 8, 8), device, dtype,
                          sigmas=functools.partial(sd3_grid, shift=cfg.sample.shift))
    if cfg.model.kind == "flux":
        from awm_fast.models.flux import load_flux_policy

        return load_flux_policy(cfg, device, dtype, prompts)
    from awm_fast.models.sd3 import load_sd3_policy

    return load_sd3_policy(cfg, device, dtype, prompts)
