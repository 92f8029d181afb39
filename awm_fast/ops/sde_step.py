"""Public rollout step: `sde_step(...)`; formulas in `awm_fast.ops.sde_step_torch`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awm_fast.ops import _validate as chk
from awm_fast.ops.dispatch import resolve_backend
from awm_fast.ops.sde_step_torch import SDE_KINDS, sde_step_torch


@dataclass
class SDEStepOutput:
    """x_next: (B, ...) in x's dtype; log_prob: (B,) float32; mean: the Gaussian mean of the step."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_level: float = 0.7,
    kind: str = "euler_maruyama",
    v_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    x_next: torch.Tensor | None = None,
    return_log_prob: bool = False,
    backend: str = "auto",
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> SDEStepOutput:
    """One Euler-Maruyama / CPS / ODE step of the rollout (sigma, sigma_next: floats or (B,) tensors).

    Sampling mode draws x_next = mean + scale * noise, with noise given, drawn from `generator` (the same
    draws on every backend), or, with `seed` (backends "triton", "cpp", "cuda"), drawn inside the kernel: element i of
    the flattened (B, ...) batch uses randn(seed, offset + i) (Philox counter offset + i, so no noise tensor
    exists and a run is reproducible; advance `offset` by x.numel() per step, keep offset + numel < 2^32).
    `out` (same shape and dtype as x; may be x itself for an in-place step) receives x_next in sampling mode.
    Sampling mode with backend "triton" is not differentiable (run rollouts under torch.no_grad()).
    Log-prob mode (`x_next` given) returns the log-prob of that transition, differentiable in v (and
    v_uncond, x, x_next). log_prob is always computed (one small reduction); `return_log_prob` only states
    intent.
    """
    chk.check_float("x", x)
    chk.check_float("v", v)
    chk.check_same_shape("v", v, "x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, ...) with at least 2 dims, got {tuple(x.shape)}")
    for name, other in (("noise", noise), ("v_uncond", v_uncond), ("x_next", x_next)):
        if other is not None:
            chk.check_float(name, other)
            chk.check_same_shape(name, other, "x", x)
    chk.check_same_device({"x": x, "v": v, "noise": noise, "v_uncond": v_uncond, "x_next": x_next})
    chk.check_choice("kind", kind, SDE_KINDS)
    if not 0 <= noise_level:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    rows = x.shape[0]
    sigma_t = chk.as_per_row("sigma", sigma, rows, x.device)
    sigma_next_t = chk.as_per_row("sigma_next", sigma_next, rows, x.device)
    _check_sampling_args(x, noise, x_next, seed, offset, out)
    chosen = resolve_backend(backend, x.device)
    args = (x, v, sigma_t, sigma_next_t, noise, generator, float(noise_level), kind, v_uncond,
            float(guidance_scale), x_next)
    if chosen in ("cpp", "cuda"):
        if x_next is None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in (x, v, v_uncond, noise)):
            if backend != "auto" or seed is not None:
                raise ValueError(f"sde_step sampling (x_next=None) with backend={chosen!r} is not differentiable: "
                                 "run it under torch.no_grad(), or use log-prob mode (x_next=...)")
            chosen = "torch"  # "auto" on CPU used to be the differentiable torch path: keep it so
        else:
            from awm_fast.ops.native_backend import sde_step_native

            return SDEStepOutput(*sde_step_native(*args, seed=seed, offset=offset, out=out))
    if chosen == "triton":
        if x_next is None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in (x, v, v_uncond, noise)):
            raise ValueError("sde_step sampling (x_next=None) with backend='triton' is not differentiable: "
                             "run it under torch.no_grad(), or use log-prob mode (x_next=...)")
        from awm_fast.ops.triton_backend import sde_step_triton

        return SDEStepOutput(*sde_step_triton(*args, seed=seed, offset=offset, out=out))
    if seed is not None:
        raise ValueError("seed= (in-kernel noise) needs backend='triton', 'cpp' or 'cuda'; with backend='torch' "
                         "pass noise= or generator=")
    result = sde_step_torch(*args)
    if out is not None:
        out.copy_(result[0])
        result = (out,) + result[1:]
    return SDEStepOutput(*result)


def _check_sampling_args(x, noise, x_next, seed, offset, out) -> None:
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed={seed!r} must be an int in [0, 2^63)")
        if noise is not None or x_next is not None:
            raise ValueError("seed= draws the noise in-kernel: give seed or noise, and no x_next")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset or offset + x.numel() > 2**32:
        raise ValueError(f"offset={offset!r} must be an int >= 0 with offset + x.numel() <= 2^32")
    if out is not None:
        if x_next is not None:
            raise ValueError("out= is for sampling mode; in log-prob mode x_next is given")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        chk.check_same_shape("out", out, "x", x)
        if out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must match x's dtype and device ({x.dtype}, {x.device}), "
                             f"got ({out.dtype}, {out.device})")
