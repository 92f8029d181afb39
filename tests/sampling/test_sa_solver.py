"""SA-Solver on analytic fields: Gaussian data N(mu, s^2) has the closed-form ODE path
x(t) = (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) x1 (computed here in float64), and the point mass lands exactly."""
import math

import pytest
import torch

from awm_fast.algo.timesteps import time_grid
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.sa_solver import adams_coefficients, sa_solver_sample

MU, SD = 1.5, 0.3


class GaussianField(torch.nn.Module):
    """v(x, t) = E[eps - x0 | x_t] for x0 ~ N(MU, SD^2): -mu + var'(t) / (2 var(t)) (x - (1 - t) mu)."""

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        t = (timestep.double() / 1000).view(-1, 1, 1, 1)
        var, dvar = (1 - t) ** 2 * SD**2 + t**2, -2 * (1 - t) * SD**2 + 2 * t
        return (-MU + dvar / (2 * var) * (hidden_states.double() - (1 - t) * MU),)


def _policy():
    return FlowPolicy(GaussianField(), encode=None, decode=None, latent_shape=(1, 2, 2), device=torch.device("cpu"),
                      dtype=torch.float64)


def _ode_error(sampler: str, steps: int, shift: float) -> float:
    cond = Conditioning(torch.zeros(4, 1, 2), torch.zeros(4, 2))
    x1 = torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(0)).double()
    x, _ = sample_latents(_policy(), cond, time_grid(steps, shift), sampler=sampler, noise_level=0.0,
                          generator=torch.Generator().manual_seed(0))
    return (x.double() - (MU + SD * x1)).abs().max().item()


def test_tau_zero_converges_at_second_order_where_euler_is_first_order():
    sa = [_ode_error("sa_solver", n, 1.0) for n in (32, 64, 128)]
    euler = [_ode_error("ode", n, 1.0) for n in (32, 64, 128)]
    for coarse, fine in zip(sa[:-1], sa[1:]):
        assert coarse / fine > 3.4  # 2nd order: ratio -> 4 per halving
    for coarse, fine in zip(euler[:-1], euler[1:]):
        assert 1.7 < coarse / fine < 2.3  # Euler: ratio 2
    assert sa[-1] < euler[-1] / 20


def test_noise_in_the_window_keeps_the_data_distribution():
    """tau = 0.4 in 0.3 <= t <= 0.9 (the official setting): samples still follow N(MU, SD^2)."""
    cond = Conditioning(torch.zeros(4000, 1, 2), torch.zeros(4000, 2))
    x, log_prob = sample_latents(_policy(), cond, time_grid(100, 3.0), sampler="sa_solver", noise_level=0.4,
                                 generator=torch.Generator().manual_seed(1), sa_noise_window=(0.3, 0.9))
    assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - SD) < 0.01
    assert torch.equal(log_prob, torch.zeros(4000))
    x2, _ = sample_latents(_policy(), cond, time_grid(100, 3.0), sampler="sa_solver", noise_level=0.4,
                           generator=torch.Generator().manual_seed(2), sa_noise_window=(0.3, 0.9))
    assert not torch.allclose(x, x2)  # the noise is real: other seeds, other samples


def test_point_mass_lands_exactly():
    from tests.sampling.test_rollout import _policy as point_mass_policy

    target = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    policy = point_mass_policy(target)
    cond = Conditioning(torch.zeros(3, 2, 8), torch.zeros(3, 8))
    x0, _ = sample_latents(policy, cond, time_grid(14, 3.0), sampler="sa_solver", noise_level=0.4,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, target.expand(3, -1, -1, -1), atol=1e-5, rtol=1e-5)
    assert len(policy.transformer.calls) == 14  # PEC: one model call per step, as Euler


def test_adams_coefficients_integrate_constants_and_lines_exactly():
    lam_s, lam_t, c = -0.4, 0.3, 1 + 0.4**2
    h = lam_t - lam_s
    u = torch.linspace(lam_s, lam_t, 200001, dtype=torch.float64)
    weight = c * torch.exp(-c * (lam_t - u))
    integral = lambda f: torch.trapezoid(weight * f, u).item()
    (b,) = adams_coefficients([lam_s], lam_s, lam_t, math.exp(-h), c)
    assert b == pytest.approx(integral(torch.ones_like(u)), rel=1e-9)
    for nodes in ([lam_s, -1.1], [lam_t, lam_s]):  # predictor (extrapolating) and corrector nodes
        b = adams_coefficients(nodes, lam_s, lam_t, math.exp(-h), c)
        for f in (lambda x: torch.ones_like(x) * 2.0, lambda x: 3 * x - 1):
            exact = integral(f(u))
            assert sum(bj * f(torch.tensor(n, dtype=torch.float64)).item() for bj, n in zip(b, nodes)) == \
                pytest.approx(exact, rel=1e-8, abs=1e-10)


def test_bad_arguments():
    cond = Conditioning(torch.zeros(1, 1, 2), torch.zeros(1, 2))
    g = torch.Generator()
    with pytest.raises(ValueError, match="order"):
        sa_solver_sample(_policy(), cond, time_grid(4, 1.0), tau=0.0, noise_window=(0.3, 0.9), generator=g,
                         predictor_order=3)
    with pytest.raises(ValueError, match="grid"):
        sa_solver_sample(_policy(), cond, time_grid(4, 1.0)[1:], tau=0.0, noise_window=(0.3, 0.9), generator=g)
    with pytest.raises(ValueError, match="finite"):
        adams_coefficients([-math.inf, 0.0], -math.inf, 0.5, 0.0, 1.0)
