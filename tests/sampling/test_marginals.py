"""Rollout marginals on Gaussian data, for every sampler and every backend present.

Data x0 ~ N(MU, SD^2) per value has the closed-form velocity v(x, t) = E[eps - x0 | x_t] = k(t) x + c(t), affine
in x, so every step of the ODE, Euler-Maruyama and CPS samplers is x' = A x + B + S xi with A, B, S known: the
EXACT law of the discrete chain is Gaussian, N(m_k, s_k^2), by the recursion m' = A m + B, s'^2 = A^2 s^2 + S^2
(transcribed here in float64 from ALGORITHM.md). The sample mean and std of n values after every step must match
it within Z standard errors (std error of the mean s / sqrt(n), of the std s / sqrt(2 n)): a wrong drift sign, a
wrong noise scale or a wrong coefficient fails. With many steps the ODE and Euler-Maruyama chains also approach the
continuous marginal N((1 - t) MU, (1 - t)^2 SD^2 + t^2), checked at the end (CPS does not preserve it by design:
its fresh noise replaces part of the x0 estimate). SA-Solver: tests/sampling/test_sa_solver.py.
"""
import math

import pytest
import torch

from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.ops import sde_step
from awm_fast.ops.dispatch import backend_present
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.timesteps import sd3_grid

MU, SD = 1.5, 0.3
Z = 4.5  # standard errors allowed; every step of every chain is checked, so a generous z keeps false alarms rare
SAMPLERS = {"ode": 0.0, "euler_maruyama": 0.7, "cps": 0.8}
BACKENDS = [b for b in ("torch", "cpp") if backend_present(b, "cpu")]


def k_and_c(t: float) -> tuple[float, float]:
    """v(x, t) = k x + c for x0 ~ N(MU, SD^2): k = var'(t) / (2 var(t)), c = -MU - k (1 - t) MU."""
    var, dvar = (1 - t) ** 2 * SD**2 + t**2, -2 * (1 - t) * SD**2 + 2 * t
    k = dvar / (2 * var)
    return k, -MU - k * (1 - t) * MU


def affine_step(kind: str, a: float, sigma: float, sigma_next: float, second: float) -> tuple[float, float, float]:
    """(A, B, S) of one step x' = A x + B + S xi (ALGORITHM.md "Rollout samplers"); `second` = the grid's second
    value, which replaces sigma = 1 in the Euler-Maruyama std."""
    k, c = k_and_c(sigma)
    dt = sigma_next - sigma
    if kind == "ode":
        return 1 + dt * k, dt * c, 0.0
    if kind == "euler_maruyama":
        std = a * math.sqrt(sigma / (1 - (second if sigma == 1 else sigma)))
        cx, cv = 1 + std**2 * dt / (2 * sigma), (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        return cx + cv * k, cv * c, std * math.sqrt(-dt)
    std = sigma_next * math.sin(a * math.pi / 2)  # CPS
    w0, w1 = 1 - sigma_next, math.sqrt(sigma_next**2 - std**2)
    return w0 * (1 - sigma * k) + w1 * (1 + (1 - sigma) * k), (w1 * (1 - sigma) - w0 * sigma) * c, std


def exact_chain(kind: str, grid: list[float]) -> list[tuple[float, float]]:
    """(mean, std) of the discrete chain after each step, from x(1) ~ N(0, 1)."""
    m, var, out = 0.0, 1.0, []
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        A, B, S = affine_step(kind, SAMPLERS[kind], sigma, sigma_next, grid[1])
        m, var = A * m + B, A**2 * var + S**2
        out.append((m, math.sqrt(var)))
    return out


class GaussianField(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        t = (timestep.double() / 1000).view(-1, 1, 1, 1)
        var, dvar = (1 - t) ** 2 * SD**2 + t**2, -2 * (1 - t) * SD**2 + 2 * t
        return (-MU + dvar / (2 * var) * (hidden_states.double() - (1 - t) * MU),)


def _policy():
    return FlowPolicy(GaussianField(), None, None, (1, 4, 4), torch.device("cpu"), torch.float64)


def _check(x: torch.Tensor, mean: float, std: float, what: str) -> None:
    n = x.numel()
    got_m, got_s = x.double().mean().item(), x.double().std().item()
    assert abs(got_m - mean) < Z * std / math.sqrt(n), f"{what}: mean {got_m:.5f}, exact {mean:.5f}"
    assert abs(got_s - std) < Z * std / math.sqrt(2 * n), f"{what}: std {got_s:.5f}, exact {std:.5f}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_every_step_follows_the_exact_law_of_the_chain(kind, backend):
    grid = sd3_grid(14, 3.0)
    exact = exact_chain(kind, grid.tolist())
    n = 1000
    cond = Conditioning(torch.zeros(n, 1, 2), torch.zeros(n, 2))
    g = torch.Generator().manual_seed(11)
    velocity = GuidedVelocity(_policy(), cond)
    x = torch.randn((n, 1, 4, 4), generator=g)
    for step, (sigma, sigma_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        v, _ = velocity(x, sigma)
        x = sde_step(x, v, sigma, sigma_next, generator=g, noise_level=SAMPLERS[kind], kind=kind,
                     backend=backend).x_next
        _check(x, *exact[step], f"{kind} ({backend}) after step {step + 1} (sigma {sigma_next:.4f})")


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_rollout_loop_ends_on_the_exact_law(kind):
    """sample_latents (the trainer's loop, default backend) ends where the chain's exact law says."""
    grid = sd3_grid(10, 3.0)
    n = 2000
    x, _ = sample_latents(_policy(), Conditioning(torch.zeros(n, 1, 2), torch.zeros(n, 2)), grid, sampler=kind,
                          noise_level=SAMPLERS[kind], generator=torch.Generator().manual_seed(5))
    _check(x, *exact_chain(kind, grid.tolist())[-1], f"{kind} rollout")


@pytest.mark.parametrize("kind", ["ode", "euler_maruyama"])
def test_fine_chains_reach_the_data_distribution(kind):
    """With 400 uniform steps the chain's exact law is within 1 % of N(MU, SD^2) (the samplers are consistent)."""
    m, s = exact_chain(kind, sd3_grid(400, 1.0).tolist())[-1]
    assert abs(m - MU) < 0.01 * MU and abs(s - SD) < 0.01 * SD


def _run_chain(kind: str, *, drift_sign: float = 1.0, noise_factor: float = 1.0) -> None:
    grid = sd3_grid(14, 3.0)
    exact = exact_chain(kind, grid.tolist())
    n = 1000
    velocity = GuidedVelocity(_policy(), Conditioning(torch.zeros(n, 1, 2), torch.zeros(n, 2)))
    g = torch.Generator().manual_seed(11)
    x = torch.randn((n, 1, 4, 4), generator=g)
    for step, (sigma, sigma_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        v, _ = velocity(x, sigma)
        x = sde_step(x, drift_sign * v, sigma, sigma_next, generator=g, noise_level=SAMPLERS[kind] * noise_factor,
                     kind=kind, backend="torch").x_next
        _check(x, *exact[step], f"{kind} after step {step + 1}")


@pytest.mark.parametrize("kind", ["euler_maruyama", "cps"])
def test_the_check_catches_a_flipped_drift_and_five_times_the_noise(kind):
    """The audit's mutations fail the same check (the deterministic last step cannot hide them)."""
    _run_chain(kind)
    with pytest.raises(AssertionError):
        _run_chain(kind, drift_sign=-1.0)
    with pytest.raises(AssertionError):
        _run_chain(kind, noise_factor=5.0 if kind == "euler_maruyama" else 1.2)  # CPS: a = 0.8 x 1.2 is ~ its max
