"""The baseline as the official AWM code runs it (scripts/train_sd3_awm.py of scxue/advantage_weighted_matching).

- LoRA through peft's own forward, one adapter per transformer call, switched the way the official script does:
  the policy with "default" active, the reference under peft's `disable_adapter` (here diffusers'
  `disable_adapters()` / `enable_adapters()` on the transformer), the EMA with `set_adapter("ema")` and back
  to `set_adapter("default")`: three calls per training micro-batch. No routing mask is set during any call,
  so `RoutedLoraLinear` runs peft's forward (awm_fast.models.routing).
- Precision: `Accelerator(mixed_precision="fp16")` with the transformer left in float32 (LoRA configs move it
  to the device without a dtype): accelerate wraps its forward in fp16 autocast; `allow_tf32 = True` sets
  `torch.backends.cuda.matmul.allow_tf32`. Here: float32 weights, fp16 autocast and TF32 matmuls on CUDA.
- The loss in float64 (`noise_pred.double()` in `compute_log_prob_awm`): awm_loss's torch backend; the SDE
  step as Python tensor ops (the torch backend of sde_step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from awm_fast.models.lora import EMA, POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.routing import BASE, ROUTING


@contextlib.contextmanager
def peft_adapter(transformer, adapter: str | None):
    """Make `adapter` the one peft runs for the calls inside ("default": as is; None: adapters disabled; "ema":
    set_adapter("ema"), then back to "default"), as the official training loop switches them."""
    if adapter == POLICY:
        yield
    elif adapter is BASE:
        transformer.disable_adapters()
        try:
            yield
        finally:
            transformer.enable_adapters()
    elif adapter == EMA:
        transformer.set_adapter(EMA)
        try:
            yield
        finally:
            transformer.set_adapter(POLICY)
    else:
        raise ValueError(f"adapter={adapter!r} is not one of {POLICY!r}, {EMA!r} or None (the reference model)")


@dataclass
class PeftSwitchedPolicy(FlowPolicy):
    """A FlowPolicy whose adapter choice is peft's active-adapter state, not a routing mask (the official code)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, adapter: str | None = POLICY):
        if ROUTING.mask is not None:
            raise ValueError("PeftSwitchedPolicy called inside a routed() block: the routing mask would override peft")
        with peft_adapter(self.transformer, adapter):
            return self.routed_velocity(x, t, cond, None)


@contextlib.contextmanager
def official_mixed_precision(device_type: str = "cuda"):
    """fp16 autocast with TF32 matmuls allowed (restored afterwards): the official script's precision."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast(device_type, dtype=torch.float16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
