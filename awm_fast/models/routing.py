"""Tensor-valued LoRA routing: which adapter each row of a transformer call uses, as a tensor input.

Every LoRA linear layer computes, for row b of its input x (rows = the batch of the transformer call),

    y[b] = W x[b] + sum_a  m[b, a] s_a B_a A_a x[b],      a in ("default", "ema"),  s_a = alpha / rank

with the routing mask m of shape (rows, 2): (1, 0) policy rows, (0, 0) reference rows (the base model),
(0, 1) EMA rows. Both adapters run as one rank-2r LoRA: h = x [A_default; A_ema]^T, h <- h * (m s)
broadcast over each adapter's r columns, y += h [B_default, B_ema]^T.

Why a tensor and not peft's adapter state: `set_adapter`/`disable_adapters` and per-row `adapter_names`
change Python attributes (and `requires_grad`) of every LoRA layer, which torch.compile guards on, so each
switch between policy, reference and EMA calls recompiled the blocks. Here one compiled graph serves every
mix: the mask is an ordinary input read from `ROUTING.mask` for the duration of one call (`routed`).
The "default" adapter stays peft's active, trainable adapter throughout; saving and loading are peft's.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from peft.tuners.lora.layer import Linear as LoraLinear

POLICY, EMA = "default", "ema"  # the trained adapter and the KL-anchor adapter
ADAPTERS = (POLICY, EMA)
BASE = None  # a row that uses no adapter: the reference model


class _Routing:
    """Holder of the mask of the transformer call in progress (None: peft's own forward)."""

    mask: torch.Tensor | None = None


ROUTING = _Routing()


class RoutedLoraLinear(LoraLinear):
    """peft's LoRA Linear whose forward follows `ROUTING.mask` when one is set (peft's forward otherwise)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = ROUTING.mask
        if mask is None or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        a_weight = torch.cat([self.lora_A[a].weight for a in ADAPTERS])
        b_weight = torch.cat([self.lora_B[a].weight for a in ADAPTERS], dim=1)
        rank = self.lora_A[POLICY].weight.shape[0]
        scale = mask * mask.new_tensor([self.scaling[a] for a in ADAPTERS])
        scale = scale.repeat_interleave(rank, dim=1).view(x.shape[0], *(1,) * (x.dim() - 2), 2 * rank)
        h = torch.nn.functional.linear(x.to(a_weight.dtype), a_weight) * scale.to(a_weight.dtype)
        return (result + torch.nn.functional.linear(h, b_weight)).to(result.dtype)


def enable_routing(transformer) -> int:
    """Switch every peft LoRA Linear of `transformer` to `RoutedLoraLinear`; returns how many. Both adapters
    must exist with the same rank and no dropout."""
    layers = [m for m in transformer.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        missing = [a for a in ADAPTERS if a not in layer.lora_A]
        if missing:
            raise ValueError(f"LoRA layer lacks adapter(s) {missing}: routing needs both {ADAPTERS}")
        ranks = {layer.lora_A[a].weight.shape[0] for a in ADAPTERS}
        if len(ranks) != 1:
            raise ValueError(f"adapters {ADAPTERS} have different ranks {sorted(ranks)}: routing needs one rank")
        if any(not isinstance(layer.lora_dropout[a], torch.nn.Identity) for a in ADAPTERS):
            raise ValueError("LoRA dropout is not supported with tensor routing (use lora_dropout=0)")
        if type(layer) is LoraLinear:
            layer.__class__ = RoutedLoraLinear
    return len(layers)


def routing_mask(rows_per_adapter: list[tuple[str | None, int]], device, dtype=torch.float32) -> torch.Tensor:
    """The (rows, 2) mask for consecutive row groups, e.g. [("default", R), (None, R), ("ema", R)]."""
    parts = []
    for name, rows in rows_per_adapter:
        if name is not BASE and name not in ADAPTERS:
            raise ValueError(f"adapter={name!r} is not one of {ADAPTERS} or None (the reference model)")
        onehot = torch.tensor([float(name == a) for a in ADAPTERS], dtype=dtype, device=device)
        parts.append(onehot.expand(rows, len(ADAPTERS)))
    return torch.cat(parts)


@contextlib.contextmanager
def routed(mask: torch.Tensor):
    """Route the LoRA layers by `mask` (rows, 2) for the calls inside the block."""
    if mask.dim() != 2 or mask.shape[1] != len(ADAPTERS):
        raise ValueError(f"routing mask must have shape (rows, {len(ADAPTERS)}), got {tuple(mask.shape)}")
    torch._dynamo.maybe_mark_dynamic(mask, 0)  # rows vary between calls: one compiled graph for all
    previous, ROUTING.mask = ROUTING.mask, mask
    try:
        yield
    finally:
        ROUTING.mask = previous


def enable_checkpointing(transformer) -> None:
    """Activation checkpointing of the transformer blocks, each recomputed in backward under the routing mask
    it first ran with (the mask is unset by then: diffusers' default checkpointing would recompute with peft's
    forward and fail the recompute check)."""

    def checkpoint_block(block, *args):
        mask = ROUTING.mask

        def run(*inner):
            previous, ROUTING.mask = ROUTING.mask, mask
            try:
                return block(*inner)
            finally:
                ROUTING.mask = previous

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(checkpoint_block)
