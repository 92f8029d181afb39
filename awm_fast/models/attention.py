"""Attention backends and our SD3 joint-attention processor.

diffusers' SD3 processor calls `F.scaled_dot_product_attention` directly (so `set_attention_backend` has no
effect on SD3); `SD3JointAttnProcessor` is the same computation with the attention call routed here:

    out = softmax(q k^T / sqrt(d)) v   over the concatenated [image; text] tokens.

Backends, fastest first (all with a backward pass): flash3 (FlashAttention-3, Hopper), flash2 (flash-attn),
sdpa_cudnn, sdpa_flash, xformers, sdpa_efficient, sdpa_math (PyTorch's reference).

`resolve_attention_backend` takes the first backend (of `auto`'s preference list, or the one asked for) that is
present AND passes its probe: one forward and backward of `attention` on random q, k, v at head sizes 64 and
128 in the run's device and dtype, finite, with ||out - out_math|| / ||out_math|| <= PROBE_MAX_ERR against
sdpa_math in float64. A present backend can still fail on a new machine (a flash build without this GPU's
arch, cuDNN attention's backward); each one passed over gets one log line with the reason. sdpa_math, the last
resort, is not probed.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash3", "flash2", "xformers", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
PREFERENCE = ("flash3", "flash2", "sdpa_cudnn", "sdpa_flash", "xformers", "sdpa_efficient", "sdpa_math")
SDPA = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
# Our names -> diffusers' attention dispatch names (the families whose processors go through
# `set_attention_backend`: FLUX.1/2, Wan, Qwen-Image, Z-Image); diffusers' flash3 is forward-only (no training).
DIFFUSERS_BACKENDS = {"flash2": "flash", "xformers": "xformers", "sdpa_cudnn": "_native_cudnn",
                      "sdpa_flash": "_native_flash", "sdpa_efficient": "_native_efficient", "sdpa_math": "_native_math"}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backend_available(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `name` can run (forward and backward) for tensors of this device and dtype."""
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "flash3":
        return cuda and half and _has("flash_attn_interface") and torch.cuda.get_device_capability(device)[0] == 9
    if name == "flash2":
        return cuda and half and _has("flash_attn")
    if name == "xformers":
        return cuda and _has("xformers")
    if name == "sdpa_cudnn":
        return cuda and half
    if name == "sdpa_flash":
        return half if cuda else dtype in (torch.float32, torch.float16, torch.bfloat16)
    if name == "sdpa_efficient":
        return cuda
    return name == "sdpa_math"


PROBE_SHAPES = ((1, 2, 24, 64), (1, 2, 24, 128))  # (B, H, S, D): SD3's head size; FLUX, Wan, Qwen-Image, Z-Image's
PROBE_MAX_ERR = 2e-2


def probe_failure(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `name` fails its probe (module docstring) on this device and dtype; None when it passes."""
    try:
        for shape in PROBE_SHAPES:
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.float64) for _ in range(3))
            ins = [a.to(dtype).requires_grad_(True) for a in (q, k, v)]
            out = attention(*ins, name)
            out.float().square().sum().backward()
            ref = attention(q, k, v, "sdpa_math")
            err = float((out.detach().double() - ref).norm() / ref.norm())
            if not all(bool(torch.isfinite(a).all()) for a in (out, *(i.grad for i in ins))):
                return f"a non-finite output or gradient at head size {shape[-1]}"
            if not err <= PROBE_MAX_ERR:
                return f"relative error {err:.1e} against sdpa_math at head size {shape[-1]}"
    except (RuntimeError, ImportError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    return None


def _passes_probe(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    reason = None if name == "sdpa_math" else probe_failure(name, device, dtype)
    if reason is not None:
        logger.warning(f"[attention] {name} failed its probe on {device.type}/{str(dtype).removeprefix('torch.')} "
                       f"({reason}): trying the next backend")
    return reason is None


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype,
                              skip: tuple[str, ...] = ()) -> str:
    """`auto`: the fastest available (not in `skip`) that passes its probe; an explicit choice that is not
    available or fails its probe falls back the same way with a one-line notice."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not one of {BACKENDS}")
    present = name != "auto" and backend_available(name, device, dtype)
    if present and _passes_probe(name, device, dtype):
        return name
    chosen = next(b for b in PREFERENCE if b not in skip and b != name and backend_available(b, device, dtype)
                  and _passes_probe(b, device, dtype))
    if name == "auto" or present:  # present: its probe failure was the one warning
        logger.info(f"[attention] {name} -> {chosen} ({device.type}, {str(dtype).removeprefix('torch.')})")
    else:
        logger.warning(f"[attention] {name} is not available for {device.type}/{str(dtype).removeprefix('torch.')} "
                       f"(missing package or unsupported device): using {chosen}")
    return chosen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """q, k, v: (B, H, S, D) -> (B, H, S, D), non-causal, no mask, no dropout."""
    if backend in SDPA:
        with sdpa_kernel(SDPA[backend]):
            return F.scaled_dot_product_attention(q, k, v)
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D) for the external kernels
    if backend == "flash3":
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(qs, ks, vs)
        out = out[0] if isinstance(out, tuple) else out
    elif backend == "flash2":
        from flash_attn import flash_attn_func

        out = flash_attn_func(qs, ks, vs)
    elif backend == "xformers":
        from xformers.ops import memory_efficient_attention

        out = memory_efficient_attention(qs, ks, vs)
    else:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS[1:]}")
    return out.transpose(1, 2)


class SD3JointAttnProcessor:
    """SD3 joint attention (and the dual-attention self-attention) with a selectable backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n_img = hidden_states.shape[1]
        q, k, v = (self._heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck, cv = (self._heads(proj(encoder_hidden_states), attn.heads)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = attention(q, k, v, self.backend)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


def use_attention_backend(transformer, backend: str) -> None:
    """Install `SD3JointAttnProcessor(backend)` on every attention module of an SD3 transformer."""
    transformer.set_attn_processor(SD3JointAttnProcessor(backend))


def set_diffusers_attention(transformer, backend: str, family: str) -> None:
    """diffusers' attention dispatch on `transformer` for one of our backend names (DIFFUSERS_BACKENDS); flash3
    stops with one line (no backward pass there)."""
    if backend == "flash3":
        raise ValueError(f"model.attention_backend=flash3 has no backward pass in diffusers' {family} attention "
                         "dispatch: use flash2, sdpa_cudnn or sdpa_flash for training")
    transformer.set_attention_backend(DIFFUSERS_BACKENDS[backend])
