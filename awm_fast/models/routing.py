"""Tensor-valued LoRA routing: which adapter each row of a transformer call uses, as a tensor input.

Every LoRA linear layer computes, for row b of its input x (rows = the batch of the transformer call),

    y[b] = W x[b] + sum_a  m[b, a] s_a B_a A_a x[b],      a in ("default", "ema"),  s_a = alpha / rank

with the routing mask m of shape (rows, 2): (1, 0) policy rows, (0, 0) reference rows (the base model),
(0, 1) EMA rows. The adapters a call runs form one rank-(k r) LoRA: h = x [A_a; ...]^T, h <- h * (m s)
broadcast over each adapter's r columns, y += h [B_a, ...]^T.

Which adapters run is a static descriptor decided on the host when the mask is built (`routing_mask` attaches
the adapters its rows use; `routed(mask, adapters=...)` may name them), so no layer reads the mask's values:
    only policy rows (with or without reference rows)  -> the "default" product alone (rank r)
    EMA and/or reference rows, no policy row            -> the "ema" product alone (rank r; reference-only calls
                                                           share this graph, the mask zeroing its rows, so that
                                                           a compiled [reference; ema] call and a reference call
                                                           are one graph and the shared batch's frozen call costs
                                                           no more than the separate reference and EMA calls)
    policy and EMA rows, or a mask of unknown origin   -> both (rank 2r), right for any mask values
and a call under grad mode always runs the "default" product (rows without it give it a zero gradient, and a
loss over the output backpropagates as with peft's forward).
A mask that is copied (`clone()`, `.to()`) loses the descriptor and runs both adapters: correct for whatever
values are copied into it later. CUDA graphs' static mask buffers keep it (graphs are keyed by it:
models.cuda_graphs).

Merged LoRA (models.merged_lora, model.merged_lora): a no-grad call routed with `merged=True` whose mask has
equal row groups (`GROUPS`, set by `routing_mask`) runs, per row group, the base layer alone on a copy of the
projection weight with that group's adapter merged in (reference rows: the base weight): no LoRA product.

The per-layer scales s_a live on the device as the non-persistent buffer `routing_scales` (created by
`enable_routing` from peft's `scaling`, moved by `.to()`, absent from state dicts and checkpoints; call
`enable_routing` again after changing peft's scaling).

Why a tensor and not peft's adapter state: `set_adapter`/`disable_adapters` and per-row `adapter_names`
change Python attributes (and `requires_grad`) of every LoRA layer, which torch.compile guards on, so each
switch between policy, reference and EMA calls recompiled the blocks. Here the mask is an ordinary input read
from `ROUTING.mask` for the duration of one call (`routed`); torch.compile keeps one graph per descriptor.
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
SCALES = "routing_scales"  # the per-layer (2,) buffer of s_a, in ADAPTERS order
DESCRIPTOR = "awm_routing_adapters"  # attribute of a mask built by `routing_mask`: the adapters its rows use
GROUPS = "awm_routing_groups"  # attribute of a `routing_mask` mask whose row groups are equal: their adapters in order
MERGED = {POLICY: "merged_default", EMA: "merged_ema"}  # layer buffers of the merged copies (models.merged_lora)


class _Routing:
    """The mask of the transformer call in progress (None: peft's own forward) and the contiguous range
    [first, last) of ADAPTERS whose products the layers run (see the module docstring)."""

    mask: torch.Tensor | None = None
    products: tuple[int, int] = (0, len(ADAPTERS))
    merged: tuple | None = None  # a merged call: the adapter (None: reference) of each equal row group, in order


ROUTING = _Routing()


def products_for(adapters) -> tuple[int, int]:
    """The [first, last) range of ADAPTERS run for a call whose rows use `adapters` (None: unknown, all)."""
    if adapters is None:
        return 0, len(ADAPTERS)
    unknown = [a for a in adapters if a is not BASE and a not in ADAPTERS]
    if unknown:
        raise ValueError(f"adapters {unknown} are not in {ADAPTERS} or None (the reference model)")
    if POLICY in adapters:
        return (0, 2) if EMA in adapters else (0, 1)
    return 1, 2  # EMA and/or reference rows only: the EMA product, zeroed on reference rows by the mask


class RoutedLoraLinear(LoraLinear):
    """peft's LoRA Linear whose forward follows `ROUTING.mask` when one is set (peft's forward otherwise)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = ROUTING.mask
        if mask is None or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        if ROUTING.merged is not None:
            return self._merged_forward(x, ROUTING.merged)
        result = self.base_layer(x, *args, **kwargs)
        first, last = ROUTING.products
        names = ADAPTERS[first:last]
        if len(names) == 1:
            a_weight, b_weight = self.lora_A[names[0]].weight, self.lora_B[names[0]].weight
        else:
            a_weight = torch.cat([self.lora_A[a].weight for a in names])
            b_weight = torch.cat([self.lora_B[a].weight for a in names], dim=1)
        rows, rank = x.shape[0], self.lora_A[POLICY].weight.shape[0]
        scale = mask[:, first:last] * getattr(self, SCALES)[first:last]  # (rows, k): m[b, a] s_a
        scale = scale.unsqueeze(-1).expand(rows, len(names), rank).reshape(rows, *(1,) * (x.dim() - 2), -1)
        h = torch.nn.functional.linear(x.to(a_weight.dtype), a_weight) * scale.to(a_weight.dtype)
        return (result + torch.nn.functional.linear(h, b_weight)).to(result.dtype)

    def _merged_forward(self, x: torch.Tensor, groups: tuple) -> torch.Tensor:
        """y_g = W_g x_g + b for each equal row group g (W_g: the merged copy of g's adapter, or the base weight
        for reference rows): the base GEMM only."""
        base = self.base_layer
        outs = []
        for chunk, adapter in zip(x.chunk(len(groups)) if len(groups) > 1 else (x,), groups):
            if adapter is BASE:
                outs.append(base(chunk))
            elif hasattr(base, "forward_with"):  # a float8 base layer (models.fp8)
                outs.append(base.forward_with(chunk, getattr(self, MERGED[adapter])))
            else:
                outs.append(torch.nn.functional.linear(chunk, getattr(self, MERGED[adapter]), base.bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def enable_routing(transformer) -> int:
    """Switch every peft LoRA Linear of `transformer` to `RoutedLoraLinear` and (re)create its `routing_scales`
    buffer from peft's scaling; returns how many. Both adapters must exist with the same rank and no dropout."""
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
        weight = layer.lora_A[POLICY].weight
        scales = torch.tensor([float(layer.scaling[a]) for a in ADAPTERS], dtype=torch.float32)
        layer.register_buffer(SCALES, scales.to(weight.device), persistent=False)
    return len(layers)


def routing_mask(rows_per_adapter: list[tuple[str | None, int]], device, dtype=torch.float32) -> torch.Tensor:
    """The (rows, 2) mask for consecutive row groups, e.g. [("default", R), (None, R), ("ema", R)], carrying
    the adapters it uses as its static descriptor (filled on the device: no tensor from Python data)."""
    mask = torch.zeros(sum(rows for _, rows in rows_per_adapter), len(ADAPTERS), dtype=dtype, device=device)
    start = 0
    for name, rows in rows_per_adapter:
        if name is not BASE and name not in ADAPTERS:
            raise ValueError(f"adapter={name!r} is not one of {ADAPTERS} or None (the reference model)")
        if name is not BASE:
            mask[start:start + rows, ADAPTERS.index(name)] = 1.0
        start += rows
    setattr(mask, DESCRIPTOR, frozenset(name for name, rows in rows_per_adapter if rows > 0))
    used = [(name, rows) for name, rows in rows_per_adapter if rows > 0]
    if used and len({rows for _, rows in used}) == 1:
        setattr(mask, GROUPS, tuple(name for name, _ in used))
    return mask


def merged_groups(mask: torch.Tensor) -> tuple | None:
    """The equal row groups' adapters of a `routing_mask` mask, or None (unequal groups, a copied mask)."""
    return getattr(mask, GROUPS, None)


@contextlib.contextmanager
def routed(mask: torch.Tensor, adapters=None, merged: bool = False):
    """Route the LoRA layers by `mask` (rows, 2) for the calls inside the block. `adapters`: the adapter names
    (None for reference rows) that the mask's rows use; default: the mask's descriptor from `routing_mask`, or
    both adapters for a mask without one. Naming fewer adapters than the rows use gives wrong values.
    `merged`: a no-grad call whose mask has equal row groups runs the merged copies (the caller keeps them
    fresh: models.merged_lora); ignored under grad mode and for other masks."""
    if mask.dim() != 2 or mask.shape[1] != len(ADAPTERS):
        raise ValueError(f"routing mask must have shape (rows, {len(ADAPTERS)}), got {tuple(mask.shape)}")
    first, last = products_for(getattr(mask, DESCRIPTOR, None) if adapters is None else adapters)
    products = (0, last) if torch.is_grad_enabled() else (first, last)  # a grad call keeps the policy product
    torch._dynamo.maybe_mark_dynamic(mask, 0)  # rows vary between calls: one compiled graph for all
    groups = merged_groups(mask) if merged and not torch.is_grad_enabled() else None
    previous = ROUTING.mask, ROUTING.products, ROUTING.merged
    ROUTING.mask, ROUTING.products, ROUTING.merged = mask, products, groups
    try:
        yield
    finally:
        ROUTING.mask, ROUTING.products, ROUTING.merged = previous


def enable_checkpointing(transformer) -> None:
    """Activation checkpointing of the transformer blocks, each recomputed in backward under the routing mask
    it first ran with (the mask is unset by then: diffusers' default checkpointing would recompute with peft's
    forward and fail the recompute check)."""

    def checkpoint_block(block, *args):
        state = ROUTING.mask, ROUTING.products, ROUTING.merged

        def run(*inner):
            previous = ROUTING.mask, ROUTING.products, ROUTING.merged
            ROUTING.mask, ROUTING.products, ROUTING.merged = state
            try:
                return block(*inner)
            finally:
                ROUTING.mask, ROUTING.products, ROUTING.merged = previous

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(checkpoint_block)
