"""Merged LoRA for the no-grad calls (model.merged_lora): the rollout steps, evaluation and the frozen
[reference; ema] call run the base GEMM only, on a copy of each LoRA projection's weight with the adapter merged in.

    W_a = round(W + s_a B_a A_a)     (the product in float32 from the float32 LoRA weights, rounded once to the
                                       base weight's dtype; a = "default" or "ema")
    a merged call, row group g:  y_g = W_g x_g + b,  W_g = W for reference rows, W_a for adapter a's rows

A copy is rebuilt from the current LoRA weights whenever they changed (after each optimizer step for
"default", each EMA update for "ema", a checkpoint load or the evaluation-EMA swap), never by unmerging an old
copy, so nothing drifts. Change detection: the version counters (and storage) of the adapter's A and B tensors,
which every in-place update (optimizer step, copy_, mul_) bumps; `refresh` re-merges a stale adapter before a
no-grad call, `check` raises on a stale copy.

Copy, not one concatenated GEMM: a copy costs one projection weight per adapter in the base dtype, for
SD3.5-M's default targets (attention q, k, v, out and the context q, k, v, out of 24 blocks at hidden 1536:
191 projections, 451M weights) 0.90 GB per adapter in bf16, 1.80 GB for both: small next to the GPU and
to the activations, while [W | B] concatenation would still run the rank-r A product every call.

Merged calls need equal row groups (the mask's `routing.GROUPS`, e.g. [reference; ema]); a grad call (the
policy rows in training) always runs the unmerged LoRA product, whose weights get the gradient.
Under model.fp8 the copies would be float8 too, rounding the adapter's delta at e4m3's 2^-3 relative spacing
(far coarser than a LoRA update), so config.validate refuses the two together.
"""
from __future__ import annotations

import torch

from awm_fast.models.routing import ADAPTERS, BASE, MERGED, RoutedLoraLinear


class MergedLora:
    """The merged copies of every routed LoRA layer of `transformer` (non-persistent buffers `routing.MERGED[a]`
    on each layer: moved by `.to()`, absent from state dicts and checkpoints) and their freshness."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.layers = [m for m in transformer.modules() if isinstance(m, RoutedLoraLinear)]
        if not self.layers:
            raise ValueError("model.merged_lora=true: the transformer has no routed LoRA layer")
        for layer in self.layers:
            weight = layer.base_layer.weight
            for adapter in ADAPTERS:
                layer.register_buffer(MERGED[adapter], torch.empty_like(weight), persistent=False)
        self.stamps: dict[str, tuple | None] = {a: None for a in ADAPTERS}
        self.merges = {a: 0 for a in ADAPTERS}  # how many times each adapter was merged (tests, logs)

    def nbytes(self) -> int:
        return sum(getattr(layer, MERGED[a]).nbytes for layer in self.layers for a in ADAPTERS)

    def _stamp(self, adapter: str) -> tuple:
        return tuple((w._version, w.data_ptr()) for layer in self.layers
                     for w in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight))

    def stale(self, adapter: str) -> bool:
        return self.stamps[adapter] != self._stamp(adapter)

    @torch.no_grad()
    def merge(self, adapter: str) -> None:
        """W_a = round(W + s_a B_a A_a) for every layer, from the current float32 LoRA weights."""
        for layer in self.layers:
            base = layer.base_layer
            delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
            delta *= float(layer.scaling[adapter])
            merged = getattr(layer, MERGED[adapter])
            merged.copy_(base.weight.float() + delta)
        self.stamps[adapter] = self._stamp(adapter)
        self.merges[adapter] += 1

    def refresh(self, groups) -> None:
        """Re-merge each adapter of `groups` (adapter names, None for reference rows) whose copy is stale."""
        for adapter in set(groups) - {BASE}:
            if self.stale(adapter):
                self.merge(adapter)

    def check(self, groups) -> None:
        """Raise ValueError if the copy of an adapter of `groups` is stale (its LoRA weights changed since)."""
        stale = sorted(a for a in set(groups) - {BASE} if self.stale(a))
        if stale:
            raise ValueError(f"merged LoRA copy of adapter(s) {stale} is stale: its LoRA weights changed after the "
                             "merge (call MergedLora.refresh before a merged call)")
