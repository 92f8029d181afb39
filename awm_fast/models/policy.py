"""The policy as the trainer sees it: a velocity field v(x_t, t, c) with adapter choice, plus codecs.

The transformer is called with timestep = 1000 t (the SD3 convention) and predicts v = eps - x0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from awm_fast.models.finetune import LORA, Finetune
from awm_fast.models.lora import POLICY
from awm_fast.models.routing import merged_groups, routed, routing_mask


@dataclass
class Conditioning:
    """Encoded prompts: token embeddings (B, L, D), pooled embeddings (B, P) (P = 0 for families without one)
    and, for families whose prompts have different lengths (Qwen-Image, Z-Image), the token mask (B, L) bool,
    True on real tokens (None: every token is real)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], self.pooled[idx], None if self.mask is None else self.mask[idx])

    def repeat(self, times: int) -> "Conditioning":
        mask = None if self.mask is None else self.mask.repeat(times, 1)
        return Conditioning(self.embeds.repeat(times, 1, 1), self.pooled.repeat(times, 1), mask)

    def to(self, device=None, dtype=None) -> "Conditioning":
        """embeds and pooled to `device` / `dtype`; the mask (bool) to `device` only."""
        mask = None if self.mask is None else self.mask.to(device)
        return Conditioning(self.embeds.to(device, dtype), self.pooled.to(device, dtype), mask)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenated along the batch; token lengths that differ are right-padded with zeros (mask False)."""
        length = max(c.embeds.shape[1] for c in items)
        if all(c.mask is None and c.embeds.shape[1] == length for c in items):
            return Conditioning(torch.cat([c.embeds for c in items]), torch.cat([c.pooled for c in items]))
        embeds, masks = [], []
        for c in items:
            pad = length - c.embeds.shape[1]
            mask = c.mask if c.mask is not None else torch.ones(c.embeds.shape[:2], dtype=torch.bool,
                                                                 device=c.embeds.device)
            embeds.append(torch.nn.functional.pad(c.embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(mask.bool(), (0, pad), value=False))
        return Conditioning(torch.cat(embeds), torch.cat([c.pooled for c in items]), torch.cat(masks))


@dataclass
class FlowPolicy:
    """transformer: a diffusers SD3-style transformer with "default" and "ema" LoRA adapters; or, for full
    fine-tuning (`finetune` = models.finetune.FULL), the trained transformer itself, `models` = {"default": it,
    None: the frozen reference, "ema": the frozen EMA copy}: the adapter argument then picks the module (no
    routing mask). `finetune` answers every question that differs between the two (models.finetune).

    encode(prompts) -> Conditioning; decode(latents) -> images in [0, 1], (B, C, H, W) float32.
    sigmas(N) -> the N + 1 sigmas (float64, 1 down to 0) of the model's own scheduler (sampling.timesteps): the
    rollout, evaluation and training-strata grid.
    """

    transformer: torch.nn.Module
    encode: Callable[[list[str]], Conditioning]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype = torch.float32
    call: Callable | None = None  # call(transformer, x, t, cond) -> v; None: the SD3 call below
    graphs: Callable | None = None  # models.cuda_graphs.VelocityGraphs(self.forward): no-grad calls replayed
    models: dict | None = None  # full fine-tuning: {"default": trained, None: reference, "ema": EMA copy}
    finetune: Finetune = LORA  # train.finetune's strategy (models.finetune), set by models.adapt.make_full_models
    sigmas: Callable[[int], torch.Tensor] | None = None  # the scheduler's grid for N steps (see above)
    merged: object | None = None  # models.merged_lora.MergedLora (model.merged_lora): no-grad calls on merged copies
    _masks: dict = field(default_factory=dict, repr=False)  # routing masks by (adapter, rows, device)

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The N + 1 sigmas of the model's scheduler for an N-step rollout (float64)."""
        if self.sigmas is None:
            raise ValueError("this policy has no scheduler grid (FlowPolicy.sigmas is None)")
        return self.sigmas(num_steps)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, adapter: str | None = POLICY) -> torch.Tensor:
        """v(x, t, c) with the given adapter ("default", "ema", or None for the reference = base model)."""
        module = self.finetune.module_for(self, adapter)
        if module is not None:
            return self.routed_velocity(x, t, cond, None, module=module)
        key = (adapter, x.shape[0], x.device)
        if key not in self._masks:
            self._masks[key] = routing_mask([(adapter, x.shape[0])], x.device)
        return self.routed_velocity(x, t, cond, self._masks[key])

    def routed_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, mask: torch.Tensor | None,
                        module: torch.nn.Module | None = None) -> torch.Tensor:
        """v(x, t, c) with row b using the adapters mask[b] (models.routing); under autocast when the
        transformer's dtype is a half type (the LoRA / fully trained weights stay float32); no-grad calls replay
        CUDA graphs when `graphs` is set. `module` (full fine-tuning, mask None): the module to call."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        x, cond = x.to(self.dtype), cond.to(dtype=self.dtype)
        if self.merged is not None and mask is not None and not torch.is_grad_enabled():
            self.merged.refresh(merged_groups(mask) or ())  # re-merge an adapter changed since (optimizer step)
        if self.graphs is not None and module is None and not torch.is_grad_enabled():
            token_mask = () if cond.mask is None else (cond.mask,)
            return self.graphs(x, t, cond.embeds, cond.pooled, mask, *token_mask)
        return self.forward(x, t, cond.embeds, cond.pooled, mask, cond.mask, module=module)

    def forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                mask: torch.Tensor | None, token_mask: torch.Tensor | None = None,
                module: torch.nn.Module | None = None) -> torch.Tensor:
        """The transformer call itself (inputs already in the transformer's dtype, t per row in [0, 1]; `mask`
        the LoRA routing mask, `token_mask` the conditioning's, models with one only). The
        timestep goes in float32, as the official code passes it (1000 t in bf16 would turn 973.06 into 972)."""
        half = self.dtype in (torch.bfloat16, torch.float16)
        module = self.transformer if module is None else module
        merged = self.merged is not None and mask is not None and not torch.is_grad_enabled()
        if merged and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.merged.check(merged_groups(mask) or ())  # a stale merged copy is an error, never used
        with routed(mask, merged=merged) if mask is not None else contextlib.nullcontext(), \
                torch.autocast(self.device.type, dtype=self.dtype, enabled=half):
            if self.call is not None:
                return self.call(module, x, t.float(), Conditioning(embeds, pooled, token_mask))
            return module(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                          timestep=t.float() * 1000, return_dict=False)[0]


class GuidedVelocity:
    """Velocities of one batch with optional classifier-free guidance (`guidance_scale != 1`): one transformer
    call over [x; x] with [cond; empty prompt], returning (v_cond, v_uncond) in float32, to be combined as
    v = v_uncond + w (v_cond - v_uncond); without guidance (v, None). The doubled conditioning is built once."""

    def __init__(self, policy: FlowPolicy, cond: Conditioning, guidance_scale: float = 1.0,
                 null_cond: Conditioning | None = None) -> None:
        self.policy, self.use_cfg = policy, guidance_scale != 1.0
        if self.use_cfg and null_cond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the empty-prompt conditioning (null_cond)")
        self.cond = Conditioning.cat([cond, null_cond.repeat(cond.embeds.shape[0])]) if self.use_cfg else cond

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor, adapter: str | None = POLICY):
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), t, device=x.device)
        if not self.use_cfg:
            return self.policy.velocity(x, t, self.cond, adapter).float(), None
        v = self.policy.velocity(torch.cat([x, x]), torch.cat([t, t]), self.cond, adapter).float()
        return v.chunk(2)
