"""Triton backend: the fused kernels registered as torch custom ops in the `awm_fast` namespace.

    torch.ops.awm_fast.awm_loss_triton   (loss, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs)
    torch.ops.awm_fast.sde_step_triton   sampling: writes x' into `out` (may be x itself), returns (log_prob, mean)
    torch.ops.awm_fast.sde_log_prob_triton  log-prob mode: (log_prob, mean), differentiable in v, v_uncond, x, x'

All are `torch.library.triton_op`s, so torch.compile(fullgraph=True) traces them without a graph break and
inductor sees the kernels. Importing this module imports triton; `awm_fast.ops` imports it lazily.
"""
from typing import Optional

import torch

from awm_fast.kernels import awm_loss as common
from awm_fast.kernels.awm_loss import launch_awm_loss
from awm_fast.kernels.sde_step import launch_sde_backward, launch_sde_forward
from awm_fast.ops.torch_ops import awm_backward, awm_setup_context, call_sde_step, sde_setup_context

Tensor = torch.Tensor


@torch.library.triton_op("awm_fast::awm_loss_triton", mutates_args=())
def _awm_loss_op(v: Tensor, target: Tensor, t: Tensor, advantages: Tensor, v_ref: Optional[Tensor],
                 v_ema: Optional[Tensor], old_log_prob: Optional[Tensor], beta: float, ema_beta: float,
                 weighting: str, ghuber_power: float, clip_range: float, kl_weighting: str, ratio_mode: str,
                 num_timesteps: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch_awm_loss(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting,
                           ghuber_power, clip_range, kl_weighting, ratio_mode, num_timesteps)


_awm_loss_op.register_autograd(awm_backward, setup_context=awm_setup_context)


def awm_loss_triton(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting,
                    ghuber_power, clip_range, kl_weighting, ratio_mode, num_timesteps) -> tuple[Tensor, ...]:
    """Same arguments and returned tuple as `awm_loss_torch`; the loss is a scalar in `torch_ops.loss_dtype(v)`
    (computed with float32 accumulation, returned as float64 for float64 v)."""
    out = torch.ops.awm_fast.awm_loss_triton(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta,
                                             ema_beta, weighting, ghuber_power, clip_range, kl_weighting,
                                             ratio_mode, num_timesteps)
    return out[:6]


@torch.library.triton_op("awm_fast::sde_step_triton", mutates_args={"out"})
def _sde_step_op(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Optional[Tensor],
                 v_uncond: Optional[Tensor], out: Tensor, noise_level: float, kind: str, guidance_scale: float,
                 seed: int, offset: int) -> tuple[Tensor, Tensor]:
    """Sampling step: out <- mean + scale * noise (noise tensor, or tl.randn(seed, offset + i) when None)."""
    return launch_sde_forward(x, v, sigma, sigma_next, noise, v_uncond, None, out, noise_level, kind,
                              guidance_scale, seed, offset)


@torch.library.triton_op("awm_fast::sde_log_prob_triton", mutates_args=())
def _sde_log_prob_op(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, v_uncond: Optional[Tensor],
                     x_next: Tensor, noise_level: float, kind: str, guidance_scale: float) -> tuple[Tensor, Tensor]:
    """log p(x_next | x) and the step's mean."""
    return launch_sde_forward(x, v, sigma, sigma_next, None, v_uncond, x_next, None, noise_level, kind,
                              guidance_scale, 0, 0)


def _sde_backward(ctx, g_lp, g_mean):
    x, v, sigma, sigma_next, v_uncond, x_next = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g_lp is None and g_mean is None:
        return (None,) * 9
    gv, gvu, gx, gxn = launch_sde_backward(x, v, v_uncond, x_next, sigma, sigma_next, g_lp, g_mean, *ctx.options,
                                           need_x=need[0], need_xn=need[5])
    return gx, gv, None, None, gvu, gxn, None, None, None


_sde_log_prob_op.register_autograd(_sde_backward, setup_context=sde_setup_context)


def sde_step_triton(x, v, sigma, sigma_next, noise, generator, noise_level, kind, v_uncond, guidance_scale, x_next,
                    seed=None, offset=0, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """Same arguments and returned tuple as `sde_step_torch`, plus seed / offset / out (see `sde_step`).

    Sampling draws noise from `generator` exactly as the torch path does unless `noise` or `seed` is given.
    """
    ops = torch.ops.awm_fast
    return call_sde_step(ops.sde_step_triton, ops.sde_log_prob_triton, common.empty, x, v, sigma, sigma_next, noise,
                         generator, noise_level, kind, v_uncond, guidance_scale, x_next, seed, offset, out)
