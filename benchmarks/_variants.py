"""The variants of the phase benchmark (which optimisations are on) and what they mean on a device: weight dtype
and autocast, the ops backend, diffusers' attention default, and releasing a variant's memory afterwards. The
baseline is the official code path (benchmarks/_official.py)."""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, replace

import torch

from awm_fast.ops.dispatch import ENV_VAR
from benchmarks._official import official_mixed_precision


@dataclass(frozen=True)
class Variant:
    """Which optimisations are on. bf16=False: fp32 weights under fp16 autocast with TF32 matmuls (the official
    setting). routed_lora=False: peft's own LoRA forward, adapters switched with set_adapter / disable_adapters
    (the official code; not a toggle: without routing the compiled blocks would recompile at every switch)."""

    name: str
    bf16: bool = True
    shared_batch: bool = True
    compile_blocks: bool = True
    best_attention: bool = True
    fused_ops: bool = True
    cuda_graphs: bool = True
    routed_lora: bool = True
    fp8: bool = False  # model.fp8: frozen block projections in float8 (awm_fast/models/fp8.py)
    merged_lora: bool = False  # model.merged_lora: no-grad calls on merged LoRA copies (awm_fast/models/merged_lora.py)


FAST = Variant("fast")
BASELINE = Variant("baseline", bf16=False, shared_batch=False, compile_blocks=False, best_attention=False,
                   fused_ops=False, cuda_graphs=False, routed_lora=False)
TOGGLES = ("shared_batch", "compile_blocks", "best_attention", "fused_ops", "bf16", "cuda_graphs")
# Rows beyond fast, baseline and fast -X, e.g. `replace(FAST, name="fast +fp8", fp8=True)` after adding an `fp8`
# field above (off by default) and applying it in `_phases.Bench.policy`: that is the whole of a new variant row.
# `--variants` names them by name or by the part after "fast " ("+fp8"); they run after the toggles.
# issue 27's levers; no "+fp8 +merged_lora" row: config.validate refuses the pair (a float8 copy would round the
# LoRA delta), so the fp8 row runs the float8 base GEMM with the unmerged LoRA product
EXTRAS: list[Variant] = [replace(FAST, name="fast +fp8", fp8=True),
                         replace(FAST, name="fast +merged_lora", merged_lora=True)]


def variants(names: str | None = None) -> list[Variant]:
    """fast, baseline, then fast minus each optimisation (the pair every ratio needs comes first, so a run cut short
    by its time budget still has it). `names` (`--variants`): a comma list of `fast`, `baseline`, `-X` or `fast -X`
    with X in TOGGLES, or `toggles` for every `fast -X`; None: all of them."""
    every = [FAST, BASELINE] + [replace(FAST, name=f"fast -{t}", **{t: False}) for t in TOGGLES] + EXTRAS
    if names is None:
        return every
    by_name = {v.name: v for v in every}
    wanted: list[str] = []
    for item in (n.strip() for n in names.split(",")):
        if not item:
            continue
        if item == "toggles":
            wanted += [f"fast -{t}" for t in TOGGLES]
            continue
        name = f"fast {item}" if item[0] in "-+" else item
        if name not in by_name:
            raise ValueError(f"--variants: {item!r} is not one of fast, baseline, toggles, "
                             + ", ".join([f"-{t}" for t in TOGGLES] + [v.name for v in EXTRAS]))
        wanted.append(name)
    if not wanted:
        raise ValueError(f"--variants {names!r} names no variant")
    return [v for v in every if v.name in wanted]


def inactive_reason(variant: Variant, device: torch.device, allow_compile: bool) -> str | None:
    """Why a "fast -X" row would measure nothing new on this device (None: it is a real measurement)."""
    if device.type != "cuda":
        if variant.name == "fast -bf16":
            return "precision toggle inactive on CPU (both run float32)"
        if variant.name == "fast -fused_ops":
            return "fused ops are Triton on CUDA only (on CPU both run the torch path)"
        if variant.name == "fast -cuda_graphs":
            return "CUDA graphs need a CUDA device"
    if not allow_compile and variant.name == "fast -compile_blocks":
        return "torch.compile switched off for this run (--no-compile / --tiny)"
    return None


@contextlib.contextmanager
def ops_backend(fused: bool):
    """AWM_FAST_BACKEND=torch for the unfused ops; unset (auto) for the fused path; restored afterwards. (The
    training loss also passes its backend explicitly: `loss_backend`.)"""
    old = os.environ.get(ENV_VAR)
    if fused:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def loss_backend(variant: Variant) -> str:
    """The awm_loss backend of a variant: "auto" (fused where present) or "torch" (the float64 reference)."""
    return "auto" if variant.fused_ops else "torch"


def precision(variant: Variant, device: torch.device):
    """(weight dtype, autocast context factory) of a variant on this device (bf16=False on CUDA: float32 weights,
    fp16 autocast, TF32 matmuls, as the official script's mixed_precision="fp16" and allow_tf32)."""
    if device.type != "cuda":
        return torch.float32, contextlib.nullcontext
    if variant.bf16:
        return torch.bfloat16, contextlib.nullcontext
    return torch.float32, official_mixed_precision


def diffusers_default_attention() -> None:
    """diffusers' `set_attention_backend` also sets a process-wide active backend, which every FLUX processor
    without its own backend then uses: put diffusers' default (DIFFUSERS_ATTN_BACKEND, native SDPA) back."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName(DIFFUSERS_ATTN_BACKEND))


def release_memory(device: torch.device) -> None:
    """Collect the cycles a policy leaves (compiled block forwards, CUDA graphs) and return the cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
