"""SA-Solver (stochastic Adams, Xue et al. 2023) for rectified flow, data prediction, predictor-corrector PEC.

Rectified flow as a diffusion: alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha_t / sigma_t); the model's
data prediction is x0(x, t) = x - t v(x, t) (v after CFG). With noise tau (c = 1 + tau^2), one step s -> t,
h = lambda_t - lambda_s, E = e^{-h} = alpha_s sigma_t / (sigma_s alpha_t):

    x_t = (sigma_t / sigma_s) E^{tau^2} x_s + alpha_t sum_j b_j x0_j + sigma_t sqrt(1 - E^{2 tau^2}) xi
    b_j = int_{lambda_s}^{lambda_t} c e^{-c (lambda_t - lambda)} l_j(lambda) d lambda

with l_j the Lagrange basis over the nodes (lambda_j, x0_j). With u = lambda - lambda_t, Ec = E^c:
    M0 = int c e^{c u} du = 1 - Ec,   M1 = int c e^{c u} u du = -(1 - Ec) / c + h Ec   (u from -h to 0)
    one node: b = M0;  two nodes a, b: b_a = (M1 + (lambda_t - lambda_b) M0) / (lambda_a - lambda_b).
Predictor: nodes at the last `predictor_order` evaluated times (here lambda_s and the one before);
Evaluate x0 at the predicted x_t; Corrector: nodes lambda_t (the new evaluation) and lambda_s, the SAME xi;
PEC: the corrected state is not re-evaluated, so one model call per step, as Euler. tau = noise_level only
where noise_window[0] <= s <= noise_window[1] (official AWM presets: 0.4 in [0.3, 0.9]); tau = 0 is a
2nd-order deterministic multistep solver (DPM-Solver++(2M)-like predictor + trapezoid-like corrector).
The start t = 1 has lambda = -inf and the end t = 0 lambda = +inf: a node at lambda = -inf is never used
for interpolation (lower order), and the last step returns the order-1 prediction x0 (E = 0, sigma_t = 0).
The state is kept in float64; the result is float32.
"""
from __future__ import annotations

import math

import torch

from awm_fast.models.lora import POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity


def _lam(t: float) -> float:
    if t >= 1:
        return -math.inf
    return math.inf if t <= 0 else math.log((1 - t) / t)


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


@torch.no_grad()
def sa_solver_sample(policy: FlowPolicy, cond: Conditioning, grid: torch.Tensor, *, tau: float,
                     noise_window: tuple[float, float], generator: torch.Generator, guidance_scale: float = 1.0,
                     null_cond: Conditioning | None = None, adapter: str | None = POLICY, predictor_order: int = 2,
                     corrector_order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x0 (B, ...) float32, zeros (B,)): SA-Solver has no per-step log-prob here."""
    if predictor_order not in (1, 2) or corrector_order not in (0, 1, 2):
        raise ValueError(f"predictor_order must be 1 or 2 and corrector_order 0, 1 or 2, got "
                         f"{predictor_order}, {corrector_order}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    times = [float(x) for x in grid.tolist()]
    if times[0] != 1.0 or times[-1] != 0.0 or any(b >= a for a, b in zip(times[:-1], times[1:])):
        raise ValueError("grid must decrease strictly from 1 to 0")
    batch = cond.embeds.shape[0]
    velocity = GuidedVelocity(policy, cond, guidance_scale, null_cond)

    def data_prediction(x: torch.Tensor, t: float) -> torch.Tensor:
        v, v_uncond = (u if u is None else u.double() for u in velocity(x, t, adapter))
        if v_uncond is not None:
            v = v_uncond + guidance_scale * (v - v_uncond)
        return x - t * v

    x = torch.randn((batch, *policy.latent_shape), generator=generator, device=policy.device,
                    dtype=torch.float32).double()
    lams, x0s = [_lam(times[0])], [data_prediction(x, times[0])]
    for s, t in zip(times[:-1], times[1:]):
        if t == 0:
            x = x0s[-1]  # alpha = 1, E = 0, sigma = 0: the order-1 prediction
            break
        tau_s = tau if noise_window[0] <= s <= noise_window[1] else 0.0
        c = 1 + tau_s**2
        lam_s, lam_t = _lam(s), _lam(t)
        exp_neg_h = (1 - s) * t / (s * (1 - t))
        keep = (t / s) * exp_neg_h ** (tau_s**2)
        noise = 0.0
        if tau_s > 0:
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).double()
            noise = t * math.sqrt(1 - exp_neg_h ** (2 * tau_s**2)) * xi
        finite = [k for k in range(len(lams)) if math.isfinite(lams[k])][-predictor_order:] or [len(lams) - 1]
        b = adams_coefficients([lams[k] for k in finite], lam_s, lam_t, exp_neg_h, c)
        x_pred = keep * x + (1 - t) * sum(bj * x0s[k] for bj, k in zip(b, finite)) + noise
        x0_t = data_prediction(x_pred, t)
        if corrector_order == 0:
            x = x_pred
        else:
            nodes, values = [lam_t], [x0_t]
            if corrector_order == 2 and math.isfinite(lam_s):
                nodes, values = [lam_t, lam_s], [x0_t, x0s[-1]]
            b = adams_coefficients(nodes, lam_s, lam_t, exp_neg_h, c)
            x = keep * x + (1 - t) * sum(bj * v for bj, v in zip(b, values)) + noise
        lams.append(lam_t)
        x0s.append(x0_t)
        del lams[:-3], x0s[:-3]
    return x.float(), torch.zeros(batch, device=policy.device)
