"""Counting on the meta device: FLOPs and saved activations of real-size models, with no memory and no compute.

A model built on the meta device has every tensor's shape and dtype but no data, so the real SD3.5-M, FLUX.1-dev,
Qwen-Image, ... run their forward and backward in seconds on any CPU, and

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts every matmul, convolution and attention of the calls
  (FLOP = 2 multiply-adds); the backward of a LoRA-only training row is

      F_bwd = FLOPs(forward + backward of the policy call with LoRA) - FLOPs(the same forward)

  (input gradients through every frozen matmul, the attention backward, the LoRA weight gradients);
- saved activations: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for the backward
  of a call with grad; their bytes, each storage counted once and the model's own weights left out, are the
  activation memory the call holds until its backward (the peak of a training micro-batch above the weights).

Two things meta tensors lack are emulated: autocast (`MetaAutocast`: float32 arguments of the matmul, attention
and convolution functions cast to the half dtype, so autograd saves the half copies as autocast's would be) and a
fused attention kernel (on the meta device `scaled_dot_product_attention` always decomposes into the math path,
which saves the (S x S) attention weights; `attention="fused"` calls FlashAttention's aten op instead, which saves
q, k, v, the output and the log-sum-exp). The FlowPolicy of a meta model says device "cpu": torch has no
autocast for "meta", and the policy only uses its device for autocast and routing masks.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from awm_fast.models.lora import add_adapters
from awm_fast.models.pipeline import meta_transformer

META = torch.device("meta")
POLICY_DEVICE = torch.device("cpu")  # what a meta policy reports as its device (module docstring)
ATTENTION = ("fused", "math")


def meta_lora_model(class_name: str, config: dict, *, rank: int, alpha: int, targets, dtype=torch.float32):
    """The diffusers transformer `class_name(**config)` on the meta device in `dtype`, frozen, with the "default" and
    "ema" LoRA adapters of the trainer (`awm_fast.models.lora.add_adapters`) in float32."""
    model = meta_transformer(class_name, config).to(dtype).requires_grad_(False)
    with torch.device(META):
        add_adapters(model, rank=rank, alpha=alpha, init="gaussian", targets=list(targets))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs FlopCounterMode sees while fn() runs (forward and any backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def forward_flops(call: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one call without grad, with torch's math attention (its matmuls are what FlopCounterMode counts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        return count_flops(call)


def forward_backward_flops(call: Callable[[], torch.Tensor]) -> dict:
    """FLOPs of one policy call without grad (`forward`) and of its backward (`backward` = forward + backward
    with grad - forward), with torch's math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fwd = forward_flops(call)
    with sdpa_kernel(SDPBackend.MATH):
        full = count_flops(lambda: call().float().sum().backward())
    return {"forward": fwd, "backward": full - fwd}


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention through FlashAttention's aten op (what a fused kernel saves for backward)."""
    if attn_mask is not None or dropout_p or enable_gqa:
        raise ValueError("the fused meta attention takes no mask, dropout or GQA (got "
                         f"mask={attn_mask is not None}, dropout_p={dropout_p}, enable_gqa={enable_gqa})")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                              scale=scale)[0]


class MetaAutocast(TorchFunctionMode):
    """autocast's cast for the ops that run in the half dtype (linear, matmuls, attention, convolutions), on a
    device without autocast: their floating-point tensor arguments of another dtype are cast to `dtype` above
    autograd, so the saved tensors are the half copies. `attention="fused"`: scaled_dot_product_attention runs
    FlashAttention's aten op (module docstring); "math": torch's decomposition."""

    CAST = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
            torch.Tensor.__matmul__, F.conv1d, F.conv2d, F.conv3d, F.scaled_dot_product_attention}

    def __init__(self, dtype: torch.dtype | None, attention: str = "math") -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTION}")
        self.dtype, self.attention = dtype, attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CAST and self.dtype is not None:
            def cast(a):
                return a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() \
                    and a.dtype != self.dtype else a
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        if func is F.scaled_dot_product_attention and self.attention == "fused":
            return _flash_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


def saved_activation_bytes(model: torch.nn.Module, call: Callable[[], torch.Tensor], *,
                           dtype: torch.dtype | None, attention: str) -> dict:
    """Bytes autograd saves for the backward of `call()` (a call with grad on `model`, meta tensors): every saved
    tensor's storage once, the model's parameters and buffers left out; under `MetaAutocast(dtype, attention)`.
    Also the largest single saved storage (bytes) and the number of saved storages."""
    weights = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in weights and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), MetaAutocast(dtype, attention):
        out = call()
    del out
    return {"bytes": sum(seen.values()), "largest_bytes": max(seen.values(), default=0), "tensors": len(seen)}


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
