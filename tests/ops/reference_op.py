"""The float64 torch AWM loss as a custom op, `torch.ops.awm_fast_tests.awm_loss_ref`: the test reference for
the autograd rule the fused ops share (`awm_fast.ops.torch_ops.awm_setup_context` / `awm_backward`).

It returns the fused ops' tuple (loss, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs): values from
`awm_loss_torch` (float64), the loss in `loss_dtype(v)`, and dLoss/dv with the per-row coefficients
coefs = (c_u, c_ref, c_ema) in closed form (float64):

    dLoss/dv = c_u (v - u) + c_ref (v - v_ref) + c_ema (v - v_ema)
    c_u   = dLoss/dl * dl/dmse * 2 / D,   c_ref = beta w(t) 2 / (R D),   c_ema = ema_beta w(t) 2 / (R D)

so autograd through `awm_loss_torch` checks the coefficients, and opcheck / torch.compile check the registration.
No production path calls it (the torch backend runs `awm_loss_torch` itself).
"""
from typing import Optional

import torch

from awm_fast.ops.awm_loss_torch import MSE_EPS, awm_loss_torch, kl_weight, weighted_log_prob
from awm_fast.ops.torch_ops import awm_backward, awm_outputs_like, awm_setup_context, loss_dtype

Tensor = torch.Tensor


def dlog_prob_dmse(mse: Tensor, t: Tensor, weighting: str, ghuber_power: float) -> Tensor:
    """dl/dmse: uniform -1; t -t; t2 -t^2; huber -t / (2 sqrt(mse + eps)); ghuber -t (mse + eps)^(p - 1)."""
    if weighting == "uniform":
        return -torch.ones_like(mse)
    if weighting == "t":
        return -t
    if weighting == "t2":
        return -t * t
    if weighting == "huber":
        return -0.5 * t / torch.sqrt(mse + MSE_EPS)
    return -t * (mse + MSE_EPS) ** (ghuber_power - 1)


def policy_grad(adv: Tensor, ratio: Tensor, clip_range: float) -> Tensor:
    """d/dr max(-A r, -A clip(r, 1 - c, 1 + c)) with torch.maximum's tie rule (half to each branch)."""
    lo, hi = 1 - clip_range, 1 + clip_range
    a, c = -adv * ratio, -adv * torch.clamp(ratio, lo, hi)
    da, dc = -adv, torch.where((ratio >= lo) & (ratio <= hi), -adv, torch.zeros_like(adv))
    return torch.where(a > c, da, torch.where(a < c, dc, 0.5 * (da + dc)))


@torch.library.custom_op("awm_fast_tests::awm_loss_ref", mutates_args=())
def awm_loss_ref(v: Tensor, target: Tensor, t: Tensor, advantages: Tensor, v_ref: Optional[Tensor],
                 v_ema: Optional[Tensor], old_log_prob: Optional[Tensor], beta: float, ema_beta: float,
                 weighting: str, ghuber_power: float, clip_range: float, kl_weighting: str, ratio_mode: str,
                 num_timesteps: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Values from `awm_loss_torch` (float64), gradient coefficients in closed form (float64)."""
    with torch.no_grad():
        loss, log_prob, mse, kl, kl_ema, clipfrac = awm_loss_torch(
            v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting, ghuber_power,
            clip_range, kl_weighting, ratio_mode, num_timesteps)
        rows, f64 = v.shape[0], torch.float64
        steps = num_timesteps if ratio_mode == "sum_first" else 1
        samples = rows // steps
        vd = v.reshape(rows, -1).to(f64)
        dims = vd.shape[1]
        diff_u = vd - target.reshape(rows, -1).to(f64)
        mse64, td = diff_u.pow(2).mean(1), t.to(f64)
        lp = weighted_log_prob(mse64, td, weighting, ghuber_power).reshape(steps, samples).mean(0)
        old = lp if old_log_prob is None else old_log_prob.to(f64).reshape(steps, samples).mean(0)
        ratio = torch.exp(lp - old)
        adv = advantages.to(f64).reshape(steps, samples)[0]
        d_lp = (policy_grad(adv, ratio, clip_range) * ratio / samples).repeat(steps) / steps
        w = kl_weight(td, kl_weighting)
        coefs = torch.zeros(3, rows, dtype=f64, device=v.device)
        coefs[0] = d_lp * dlog_prob_dmse(mse64, td, weighting, ghuber_power) * 2 / dims
        grad = coefs[0, :, None] * diff_u
        for i, (other, scale) in enumerate(((v_ref, beta), (v_ema, ema_beta)), start=1):
            if other is not None:
                coefs[i] = scale * w * 2 / (rows * dims)
                grad += coefs[i, :, None] * (vd - other.reshape(rows, -1).to(f64))
    return (loss.to(loss_dtype(v)), log_prob, mse, kl, kl_ema, clipfrac, grad.to(v.dtype).reshape(v.shape), coefs)


@awm_loss_ref.register_fake
def _awm_loss_ref_fake(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting,
                       ghuber_power, clip_range, kl_weighting, ratio_mode, num_timesteps):
    return awm_outputs_like(v, coef_dtype=torch.float64)


awm_loss_ref.register_autograd(awm_backward, setup_context=awm_setup_context)
