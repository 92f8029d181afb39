"""The AWM loss in plain PyTorch, float64 inside (as the official code): the ground truth.

For R rows (one per (timestep, sample) pair) with D latent values each:

    mse_i   = mean_d (v_i - u_i)^2                          u = target = eps - x0
    l_i     = -mse_i                     (uniform)
            = -t_i mse_i                 (t)
            = -t_i^2 mse_i               (t2)
            = -t_i (sqrt(mse_i + 1e-10) - 1e-5)                       (huber)
            = -(t_i / p) ((mse_i + 1e-10)^p - (1e-10)^p)             (ghuber, p = ghuber_power)
    r_i     = exp(l_i - l_old_i)         l_old = stopgrad(l) when on-policy, so r == 1
    pol_i   = max(-A_i r_i, -A_i clip(r_i, 1 - c, 1 + c))
    kl_i    = w_i mean_d (v_i - v_ref_i)^2,  w = 1 (uniform) or 1 / (2 std_t^2) (elbo),
              std_t = 0.7 sqrt(t / (1 - min(t, 0.99)))
    loss    = mean_i pol_i + beta mean_i kl_i + ema_beta mean_i kl_ema_i

"sum_first" averages l (and l_old) over the T timesteps of each sample before the exp; rows are then
ordered timestep-major (row = k * B + b for timestep k of sample b) and the policy term is a mean over
the B samples.
"""
from __future__ import annotations

import torch

WEIGHTINGS = ("ghuber", "uniform", "t", "t2", "huber")
KL_WEIGHTINGS = ("uniform", "elbo")
RATIO_MODES = ("exp_first", "sum_first")
MSE_EPS = 1e-10
HUBER_SHIFT = 1e-5
ELBO_NOISE = 0.7


def weighted_log_prob(mse: torch.Tensor, t: torch.Tensor, weighting: str, ghuber_power: float) -> torch.Tensor:
    """l(mse, t) for one weighting; see the module docstring."""
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -t * mse
    if weighting == "t2":
        return -t * t * mse
    if weighting == "huber":
        return -t * (torch.sqrt(mse + MSE_EPS) - HUBER_SHIFT)
    if weighting == "ghuber":
        p = ghuber_power
        return -(t / p) * ((mse + MSE_EPS) ** p - MSE_EPS**p)
    raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")


def kl_weight(t: torch.Tensor, kl_weighting: str) -> torch.Tensor:
    """1 for "uniform"; 1 / (2 std_t^2) with std_t = 0.7 sqrt(t / (1 - min(t, 0.99))) for "elbo"."""
    if kl_weighting == "uniform":
        return torch.ones_like(t)
    if kl_weighting == "elbo":
        std = ELBO_NOISE * torch.sqrt(t / (1 - torch.clamp(t, max=0.99)))
        return 1.0 / (2 * std * std)
    raise ValueError(f"kl_weighting={kl_weighting!r} is not one of {KL_WEIGHTINGS}")


def kl_rows(v: torch.Tensor, v_other: torch.Tensor, t: torch.Tensor, kl_weighting: str) -> torch.Tensor:
    """(R,) float64 w(t_i) mean_d (v_i - v_other_i)^2, differentiable in v (a KL term's rows, see the module
    docstring)."""
    rows = v.shape[0]
    diff = v.reshape(rows, -1).to(torch.float64) - v_other.reshape(rows, -1).to(torch.float64)
    return kl_weight(t.to(torch.float64), kl_weighting) * diff.pow(2).mean(1)


def awm_loss_torch(
    v: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    v_ref: torch.Tensor | None,
    v_ema: torch.Tensor | None,
    old_log_prob: torch.Tensor | None,
    beta: float,
    ema_beta: float,
    weighting: str,
    ghuber_power: float,
    clip_range: float,
    kl_weighting: str,
    ratio_mode: str,
    num_timesteps: int,
) -> tuple[torch.Tensor, ...]:
    """Returns (loss, log_prob, mse, kl, kl_ema, clipfrac); loss is float64 and differentiable in v.

    Per-row outputs are float32 detached statistics, as the official code logs them.
    """
    rows = v.shape[0]
    f64 = torch.float64
    vd = v.reshape(rows, -1).to(f64)
    mse = (vd - target.reshape(rows, -1).to(f64)).pow(2).mean(1)
    td = t.to(f64)
    log_prob = weighted_log_prob(mse, td, weighting, ghuber_power)
    old = log_prob.detach() if old_log_prob is None else old_log_prob.to(f64)
    adv = advantages.to(f64)
    if ratio_mode == "sum_first":
        samples = rows // num_timesteps
        lp = log_prob.reshape(num_timesteps, samples).mean(0)
        old = old.reshape(num_timesteps, samples).mean(0)
        adv = adv.reshape(num_timesteps, samples)[0]
    else:
        lp = log_prob
    ratio = torch.exp(lp - old)
    policy = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    clipfrac = ((ratio - 1).abs() > clip_range).to(f64).mean()
    loss = policy.mean()
    zeros = torch.zeros(rows, dtype=f64, device=v.device)
    kl = kl_ema = zeros
    if v_ref is not None:
        kl = kl_rows(v, v_ref, t, kl_weighting)
        loss = loss + beta * kl.mean()
    if v_ema is not None:
        kl_ema = kl_rows(v, v_ema, t, kl_weighting)
        loss = loss + ema_beta * kl_ema.mean()
    f32 = torch.float32
    return (loss, log_prob.detach().to(f32), mse.detach().to(f32), kl.detach().to(f32),
            kl_ema.detach().to(f32), clipfrac.detach().to(f32))
