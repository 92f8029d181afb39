"""Public fused ops of awm-fast; importable with torch alone (triton optional, no diffusers/peft)."""
from awm_fast.ops.awm_loss import AWMLoss, AWMLossOutput, awm_loss
from awm_fast.ops.dispatch import BACKENDS, resolve_backend
from awm_fast.ops.sde_step import SDEStepOutput, sde_step

__all__ = ["AWMLoss", "AWMLossOutput", "BACKENDS", "SDEStepOutput", "awm_loss", "resolve_backend", "sde_step"]
