"""SA-Solver (stochastic Adams, Xue et al. 2023) for rectified flow, as the official AWM rollout runs it:
data prediction, predictor order 2, corrector order 2, PEC mode, the "few steps" coefficients.

Rectified flow as a diffusion: alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha_t / sigma_t); the model's
data prediction is x0(x, t) = x - t v(x, t) (v after CFG). One step s -> t with noise tau (c = 1 + tau^2),
h = lambda_t - lambda_s, Ec = e^{-c h}:

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s + alpha_t sum_j b_j x0_j + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi
    b_j = int_{-h}^{0} c e^{c u} l_j(lambda_t + u) du          (l_j: Lagrange basis over the nodes lambda_j)
    one node: b = M0 = 1 - Ec;  two nodes a, b: b_a = (M1 + (lambda_t - lambda_b) M0) / (lambda_a - lambda_b),
    M1 = int c e^{c u} u du = h Ec - (1 - Ec) / c.
"Few steps" (order 2 only; an O(h^3) term that the official code adds, "similar to UniPC"):
    predictor, nodes (lambda_s, lambda_r):  b_s += D, b_r -= D,  D = c (h^2 / 2 - (c h - 1 + Ec) / c^2) / (lambda_s - lambda_r)
    corrector, nodes (lambda_t, lambda_s):  b_t += E, b_s -= E,  E = c (h / 2 - (c h - 1 + Ec) / (c^2 h))
Schedule (official): the time points are the scheduler grid t_0 = 1 > ... > t_{N-1} > t_N = 0 with t_0 replaced
by 1 - 1e-3 and t_{N-1} by t_{N-2} / 2. x0 is evaluated at t_0; step k = 1 .. N-1: predictor (order 1 on the
first step, then 2), one evaluation x0(x_pred, t_k), corrector (none on the first step, then order 2, with the
SAME xi); PEC: the corrected state is not re-evaluated, so one model call per step (N in all, as Euler). The
last step returns the last data prediction x0(., t_{N-1}). tau = noise_level where noise_window[0] <= t_k <=
noise_window[1] (the step's DESTINATION time; official: 0.4 in [0.3, 0.9]), else 0; tau = 0 is a deterministic
2nd-order multistep solver. Random numbers in the official order: the initial state, one unused draw, then one
xi per step (drawn also where tau = 0). The state is kept in float64 (the official code runs in the model's
dtype); the result is float32.
"""
from __future__ import annotations

import math

import torch

from awm_fast.models.lora import POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity

FIRST_TIME = 1 - 1e-3  # the official start: lambda(1) = -inf has no data prediction to interpolate


def _lam(t: float) -> float:
    return math.log((1 - t) / t)


def official_time_points(grid: torch.Tensor) -> list[float]:
    """The scheduler grid with t_0 = 1 - 1e-3 and t_{N-1} = t_{N-2} / 2 (as the official pipeline sets them)."""
    times = [float(x) for x in grid.tolist()]
    if len(times) < 3 or times[0] != 1.0 or times[-1] != 0.0 or any(b >= a for a, b in zip(times[:-1], times[1:])):
        raise ValueError(f"SA-Solver needs a grid of >= 2 steps decreasing strictly from 1 to 0, got {times}")
    times[0], times[-2] = FIRST_TIME, times[-3] / 2
    return times


def adams_coefficients(nodes: list[float], lam_s: float, lam_t: float, exp_neg_h: float, c: float) -> list[float]:
    """b_j for one or two finite nodes (see the module docstring); exp_neg_h = e^{-(lam_t - lam_s)}."""
    ec = exp_neg_h ** c
    m0 = 1 - ec
    if len(nodes) == 1:
        return [m0]
    if len(nodes) != 2 or not all(math.isfinite(x) for x in (*nodes, lam_s, lam_t)):
        raise ValueError(f"two-node coefficients need finite lambdas, got nodes {nodes}, step {lam_s} -> {lam_t}")
    h = lam_t - lam_s
    m1 = -(1 - ec) / c + h * ec
    a, b = nodes
    return [(m1 + (lam_t - b) * m0) / (a - b), (m1 + (lam_t - a) * m0) / (b - a)]


def few_steps_coefficients(nodes: list[float], lam_s: float, lam_t: float, c: float, corrector: bool) -> list[float]:
    """The order-2 coefficients with the "few steps" term (module docstring): predictor nodes (lam_s, lam_r),
    corrector nodes (lam_t, lam_s)."""
    h = lam_t - lam_s
    b = adams_coefficients(nodes, lam_s, lam_t, math.exp(-h), c)
    ec = math.exp(-c * h)
    if corrector:
        extra = c * (h / 2 - (c * h - 1 + ec) / (c**2 * h))
    else:
        extra = c * (h**2 / 2 - (c * h - 1 + ec) / c**2) / (nodes[0] - nodes[1])
    return [b[0] + extra, b[1] - extra]


@torch.no_grad()
def sa_solver_sample(policy: FlowPolicy, cond: Conditioning, grid: torch.Tensor, *, tau: float,
                     noise_window: tuple[float, float], generator: torch.Generator, guidance_scale: float = 1.0,
                     null_cond: Conditioning | None = None, adapter: str | None = POLICY,
                     initial_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x0 (B, ...) float32, zeros (B,)): SA-Solver has no per-step log-prob here."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    times = official_time_points(grid)
    batch = cond.embeds.shape[0]
    velocity = GuidedVelocity(policy, cond, guidance_scale, null_cond)

    def data_prediction(x: torch.Tensor, t: float) -> torch.Tensor:
        v, v_uncond = (u if u is None else u.double() for u in velocity(x, t, adapter))
        if v_uncond is not None:
            v = v_uncond + guidance_scale * (v - v_uncond)
        return x - t * v

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32).double()

    shape = (batch, *policy.latent_shape)
    x = (initial_noise.float() if initial_noise is not None
         else torch.randn(shape, generator=generator, device=policy.device, dtype=torch.float32)).double()
    draw(x)  # the official sampler draws (and never uses) one noise before the first step
    x0s = [data_prediction(x, times[0])]
    for k in range(1, len(times) - 1):
        s, t = times[k - 1], times[k]
        xi = draw(x)
        tau_t = tau if noise_window[0] <= t <= noise_window[1] else 0.0
        c, lam_s, lam_t = 1 + tau_t**2, _lam(s), _lam(t)
        h = lam_t - lam_s
        keep = (t / s) * math.exp(-tau_t**2 * h)
        noise = t * math.sqrt(-math.expm1(-2 * tau_t**2 * h)) * xi if tau_t > 0 else 0.0
        if k == 1:
            (b,) = adams_coefficients([lam_s], lam_s, lam_t, math.exp(-h), c)
            x_pred = keep * x + (1 - t) * b * x0s[-1] + noise
        else:
            b = few_steps_coefficients([lam_s, _lam(times[k - 2])], lam_s, lam_t, c, corrector=False)
            x_pred = keep * x + (1 - t) * (b[0] * x0s[-1] + b[1] * x0s[-2]) + noise
        x0_t = data_prediction(x_pred, t)
        if k == 1:
            x = x_pred  # no corrector on the first step
        else:
            b = few_steps_coefficients([lam_t, lam_s], lam_s, lam_t, c, corrector=True)
            x = keep * x + (1 - t) * (b[0] * x0_t + b[1] * x0s[-1]) + noise
        x0s = [x0s[-1], x0_t]
    draw(x)  # the last step's noise (unused: the step returns the data prediction)
    return x0s[-1].float(), torch.zeros(batch, device=policy.device)
