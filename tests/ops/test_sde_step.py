"""The torch rollout step: Gaussian log-density, CPS, ODE, CFG, log-prob mode, bad input."""
import math

import pytest
import torch

from awm_fast.ops import sde_step


def _xv(gen, b=3, shape=(2, 4, 4)):
    return (torch.randn(b, *shape, generator=gen, dtype=torch.float64),
            torch.randn(b, *shape, generator=gen, dtype=torch.float64))


def test_euler_maruyama_log_prob_is_the_gaussian_density(gen):
    x, v = _xv(gen)
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    out = sde_step(x, v, sigma, sigma_next, generator=gen, noise_level=a, return_log_prob=True, backend="torch")
    dt = sigma_next - sigma
    std = a * math.sqrt(sigma / (1 - sigma)) * math.sqrt(-dt)
    mean = x * (1 + (std**2 / -dt) * dt / (2 * sigma)) + v * (1 + (std**2 / -dt) * (1 - sigma) / (2 * sigma)) * dt
    dens = torch.distributions.Normal(mean, std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob.double(), dens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean, mean)


def test_sigma_one_uses_next_grid_value_in_denominator(gen):
    x, v = _xv(gen)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = sde_step(x, v, 1.0, 0.9, noise=noise, noise_level=0.5, backend="torch")
    std = 0.5 * math.sqrt(1.0 / (1 - 0.9))
    assert torch.isfinite(out.x_next).all()
    mean = x * (1 + std**2 * -0.1 / 2) + v * (1 + 0.0) * -0.1
    torch.testing.assert_close(out.x_next, mean + std * math.sqrt(0.1) * noise)


def test_last_step_is_deterministic(gen):
    x, v = _xv(gen)
    for kind in ("euler_maruyama", "cps", "ode"):
        out = sde_step(x, v, 0.2, 0.0, generator=gen, kind=kind, return_log_prob=True, backend="torch")
        torch.testing.assert_close(out.x_next, x - 0.2 * v)
        assert (out.log_prob == 0).all()


def test_ode_follows_exact_path_of_a_constant_velocity(gen):
    x1, x0 = _xv(gen)
    x = x1.clone()
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    for s, s_next in zip(grid[:-1], grid[1:]):
        x = sde_step(x, x1 - x0, float(s), float(s_next), kind="ode", backend="torch").x_next
    torch.testing.assert_close(x, x0)


def test_cps_mean_and_log_prob(gen):
    x, v = _xv(gen)
    s, sn, a = 0.7, 0.5, 0.8
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = sde_step(x, v, s, sn, noise=noise, noise_level=a, kind="cps", return_log_prob=True, backend="torch")
    std = sn * math.sin(a * math.pi / 2)
    mean = (1 - sn) * (x - s * v) + math.sqrt(sn**2 - std**2) * (x + (1 - s) * v)
    torch.testing.assert_close(out.x_next, mean + std * noise)
    torch.testing.assert_close(out.log_prob.double(), -(std * noise).pow(2).flatten(1).mean(1), atol=1e-6, rtol=1e-5)


def test_cfg_combine(gen):
    x, v = _xv(gen)
    vu = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    a = sde_step(x, v, 0.5, 0.4, kind="ode", v_uncond=vu, guidance_scale=4.5, backend="torch").x_next
    b = sde_step(x, vu + 4.5 * (v - vu), 0.5, 0.4, kind="ode", backend="torch").x_next
    torch.testing.assert_close(a, b)


def test_log_prob_mode_is_differentiable_and_maximal_at_the_mean(gen):
    x, v = _xv(gen)
    nxt = sde_step(x, v, 0.6, 0.5, generator=gen, backend="torch").x_next
    vv = v.clone().requires_grad_()
    out = sde_step(x, vv, 0.6, 0.5, x_next=nxt, backend="torch")
    assert out.x_next is nxt
    out.log_prob.sum().backward()
    assert vv.grad is not None and torch.isfinite(vv.grad).all() and vv.grad.abs().sum() > 0
    at_mean = sde_step(x, v, 0.6, 0.5, x_next=out.mean, backend="torch").log_prob
    assert (at_mean > out.log_prob).all()


def test_per_sample_sigmas_match_scalar_calls(gen):
    x, v = _xv(gen, b=2)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    both = sde_step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.3]), noise=noise, backend="torch").x_next
    first = sde_step(x[:1], v[:1], 0.9, 0.8, noise=noise[:1], backend="torch").x_next
    torch.testing.assert_close(both[:1], first)


def test_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kind='sde'"):
        sde_step(x, x, 0.5, 0.4, kind="sde")
    with pytest.raises(ValueError, match="v has shape"):
        sde_step(x, torch.randn(2, 4), 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma must have shape"):
        sde_step(x, x, torch.rand(3), 0.4)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        sde_step(x.long(), x, 0.5, 0.4)
