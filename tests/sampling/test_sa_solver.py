"""SA-Solver against the official variant and on analytic fields.

Gaussian data x0 ~ N(MU, SD^2) has the closed-form velocity v = E[eps - x0 | x_t] and ODE path
x(t) = (1 - t) MU + sqrt(var(t) / var(t0)) (x(t0) - (1 - t0) MU), var(t) = (1 - t)^2 SD^2 + t^2, here from the
solver's official start t0 = 1 - 1e-3; its marginal at t = 0 is N(MU, SD^2) when x(1) ~ N(0, 1)."""
import math

import pytest
import torch

from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.sa_solver import adams_coefficients, official_time_points, sa_solver_sample
from awm_fast.sampling.timesteps import sd3_grid, time_grid

MU, SD = 1.5, 0.3


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(MU, SD^2): -MU + var'(t) / (2 var(t)) (x - (1 - t) MU)."""
    var, dvar = (1 - t) ** 2 * SD**2 + t**2, -2 * (1 - t) * SD**2 + 2 * t
    return -MU + dvar / (2 * var) * (x - (1 - t) * MU)


class GaussianField(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        return (gaussian_velocity(hidden_states.double(), (timestep.double() / 1000).view(-1, 1, 1, 1)),)


def _policy():
    return FlowPolicy(GaussianField(), encode=None, decode=None, latent_shape=(1, 2, 2), device=torch.device("cpu"),
                      dtype=torch.float64)


def _cond(n):
    return Conditioning(torch.zeros(n, 1, 2), torch.zeros(n, 2))


def official_reference(grid: torch.Tensor, tau_level: float, window, batch: int, seed: int) -> torch.Tensor:
    """A float64 transcription of the official sampler (predictor 2, corrector 2, PEC, few-steps coefficients,
    disable_first_corrector, denoise_to_zero at the end): coefficients as Lagrange basis x exponential moments
    int_{l_s}^{l_t} e^{c l} l^k dl, scaled by c sigma_t e^{-tau^2 l_t}; same random-number order."""
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    t_all = grid.clone().double()
    t_all[-2] = t_all[-3] / 2
    t_all[0] = 1 - 1e-3
    lam = lambda t: torch.log(1 - t) - torch.log(t)
    tau = lambda t: tau_level if window[0] <= float(t) <= window[1] else 0.0
    g = torch.Generator().manual_seed(seed)
    randn = lambda: torch.randn((batch, 1, 2, 2), generator=g, dtype=torch.float32).double()
    model = lambda x, t: x - t * gaussian_velocity(x, t)

    def moment(k, ls, lt, c):  # int_{ls}^{lt} e^{c l} l^k dl, k = 0, 1
        a, b = c * lt, c * ls
        if k == 0:
            return torch.exp(a) * (1 - torch.exp(-(a - b))) / c
        return torch.exp(a) * ((a - 1) - (b - 1) * torch.exp(-(a - b))) / c**2

    def coefficients(lams, ls, lt, c):
        if len(lams) == 1:
            return [moment(0, ls, lt, c)]
        l0, l1 = lams
        basis = [[1 / (l0 - l1), -l1 / (l0 - l1)], [1 / (l1 - l0), -l0 / (l1 - l0)]]
        return [sum(basis[i][j] * moment(1 - j, ls, lt, c) for j in range(2)) for i in range(2)]

    def update(models, t_prev, x, t, noise, corrector):
        ta = f64(tau(t))
        c = 1 + ta**2
        ls, lt = lam(t_prev[-1]), lam(t)
        h = lt - ls
        nodes = ([lt] + [lam(t_prev[-1])]) if corrector else [lam(tp) for tp in t_prev[::-1]]
        nodes = nodes[:len(models)]
        coef = coefficients(nodes, ls, lt, c)
        if len(coef) == 2:
            if corrector:
                extra = torch.exp(c * lt) * (h / 2 - (h * c - 1 + torch.exp(-c * h)) / (c**2 * h))
            else:
                extra = torch.exp(c * lt) * (h**2 / 2 - (h * c - 1 + torch.exp(-c * h)) / c**2) / (
                    lam(t_prev[-1]) - lam(t_prev[-2]))
            coef = [coef[0] + extra, coef[1] - extra]
        grad = sum(c * t * torch.exp(-ta**2 * lt) * coef[i] * models[-(i + 1)] for i in range(len(coef)))
        return torch.exp(-ta**2 * h) * (t / t_prev[-1]) * x + grad + t * torch.sqrt(1 - torch.exp(-2 * ta**2 * h)) * noise

    steps = t_all.numel() - 1
    x = randn()
    randn()
    t_prev, models = [t_all[0]], [model(x, t_all[0])]
    t = t_all[1]
    noise = randn()
    x_p = update(models[-1:], t_prev, x, t, noise, corrector=False)
    models.append(model(x_p, t))
    x = x_p
    t_prev.append(t)
    for step in range(2, steps + 1):
        t = t_all[step]
        noise = randn()
        if step == steps:
            x = models[-1]
            break
        x_p = update(models[-2:], t_prev[-2:], x, t, noise, corrector=False)
        models.append(model(x_p, t))
        x = update(models[-2:], t_prev[-2:], x, t, noise, corrector=True)
        t_prev.append(t)
        del models[0]
    return x


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_matches_a_float64_transcription_of_the_official_sampler(tau):
    grid = sd3_grid(14, 3.0)
    ours, _ = sa_solver_sample(_policy(), _cond(5), grid, tau=tau, noise_window=(0.3, 0.9),
                               generator=torch.Generator().manual_seed(7))
    ref = official_reference(grid, tau, (0.3, 0.9), 5, seed=7)
    # the policy returns float32 velocities and sees t in float32: agreement at float32 precision
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=2e-5)


def test_official_time_points():
    grid = sd3_grid(14, 3.0)
    times = official_time_points(grid)
    assert times[0] == 1 - 1e-3 and times[-1] == 0.0
    assert times[-2] == pytest.approx(grid[-3].item() / 2) and times[1:-2] == grid[1:-2].tolist()


def test_noise_is_read_at_the_destination_time():
    """Time points 0.999 -> 0.95 -> 0.85 -> 0.425 (= 0.85 / 2) -> 0: a window holding only the destination 0.425
    makes that step noisy; a window holding only the source 0.999 leaves every step deterministic."""
    grid = torch.tensor([1.0, 0.95, 0.85, 0.5, 0.0], dtype=torch.float64)
    run = lambda window, seed: sa_solver_sample(_policy(), _cond(64), grid, tau=0.4, noise_window=window,
                                                generator=torch.Generator().manual_seed(seed))[0]
    same_start = lambda window: run(window, 0) - run((0.0, 0.0), 0)  # same seed: only the step noise differs
    assert same_start((0.4, 0.45)).abs().max() > 1e-3
    torch.testing.assert_close(same_start((0.99, 1.0)), torch.zeros(64, 1, 2, 2), atol=1e-12, rtol=0)


def _exact_ode(x1: torch.Tensor, t0: float = 1 - 1e-3) -> torch.Tensor:
    var0 = (1 - t0) ** 2 * SD**2 + t0**2
    return MU + math.sqrt(SD**2 / var0) * (x1 - (1 - t0) * MU)


def _ode_error(steps: int, shift: float) -> float:
    x1 = torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(0)).double()
    x, _ = sa_solver_sample(_policy(), _cond(4), sd3_grid(steps, shift), tau=0.0, noise_window=(0.3, 0.9),
                            generator=torch.Generator().manual_seed(0))
    return (x.double() - _exact_ode(x1)).abs().max().item()


def test_deterministic_solver_is_second_order_against_the_exact_ode(record_property):
    errors = {n: _ode_error(n, 1.0) for n in (32, 64, 128, 256)}
    record_property("sa_solver_ode_max_error", errors)
    print(f"SA-Solver tau=0 max error vs exact ODE (shift 1): {errors}; official SD3 grid, 14 steps: "
          f"{_ode_error(14, 3.0):.2e}")
    for coarse, fine in zip(list(errors.values())[:-1], list(errors.values())[1:]):
        assert coarse / fine > 3.4  # 2nd order: the ratio tends to 4 per halving
    euler = sample_latents(_policy(), _cond(4), sd3_grid(256, 1.0), sampler="ode", noise_level=0.0,
                           generator=torch.Generator().manual_seed(0))[0]
    x1 = torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(0)).double()
    assert errors[256] < (euler.double() - _exact_ode(x1, 1.0)).abs().max().item() / 20
    assert _ode_error(14, 3.0) < 2e-3


def test_noise_in_the_window_keeps_the_data_distribution(record_property):
    """tau = 0.4 in 0.3 <= t <= 0.9 (the official setting) on the official 14-step grid: the sample mean and
    std match N(MU, SD^2) within 4 standard errors of 8000 samples x 4 values (+ the 14-step solver error)."""
    n = 8000
    x, log_prob = sample_latents(_policy(), _cond(n), sd3_grid(14, 3.0), sampler="sa_solver", noise_level=0.4,
                                 generator=torch.Generator().manual_seed(1), sa_noise_window=(0.3, 0.9))
    mean, std = x.double().mean().item(), x.double().std().item()
    record_property("sa_solver_tau04_std", std)
    print(f"SA-Solver tau=0.4: sample mean {mean:.4f} (true {MU}), std {std:.4f} (true {SD})")
    values = x.numel()
    assert abs(mean - MU) < 4 * SD / math.sqrt(values) + 2e-3
    assert abs(std - SD) < 4 * SD / math.sqrt(2 * values) + 2e-3
    assert torch.equal(log_prob, torch.zeros(n))
    x2, _ = sample_latents(_policy(), _cond(n), sd3_grid(14, 3.0), sampler="sa_solver", noise_level=0.4,
                           generator=torch.Generator().manual_seed(2), sa_noise_window=(0.3, 0.9))
    assert not torch.allclose(x, x2)  # the noise is real: other seeds, other samples


def test_wrong_noise_scale_is_caught():
    """The std check above has power: 5x the official tau moves the std far outside its tolerance."""
    x, _ = sample_latents(_policy(), _cond(4000), sd3_grid(14, 3.0), sampler="sa_solver", noise_level=2.0,
                          generator=torch.Generator().manual_seed(1), sa_noise_window=(0.3, 0.9))
    assert abs(x.double().std().item() - SD) > 0.01


def test_point_mass_lands_exactly():
    from tests.sampling.test_rollout import _policy as point_mass_policy

    target = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    policy = point_mass_policy(target)
    cond = Conditioning(torch.zeros(3, 2, 8), torch.zeros(3, 8))
    x0, _ = sample_latents(policy, cond, time_grid(14, 3.0), sampler="sa_solver", noise_level=0.4,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, target.expand(3, -1, -1, -1), atol=1e-5, rtol=1e-5)
    assert len(policy.transformer.calls) == 14  # PEC: one model call per step, as Euler
    assert policy.transformer.calls[0] == pytest.approx(1 - 1e-3)


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
    g = torch.Generator()
    with pytest.raises(ValueError, match="tau"):
        sa_solver_sample(_policy(), _cond(1), time_grid(4, 1.0), tau=-0.1, noise_window=(0.3, 0.9), generator=g)
    with pytest.raises(ValueError, match="grid"):
        sa_solver_sample(_policy(), _cond(1), time_grid(4, 1.0)[1:], tau=0.0, noise_window=(0.3, 0.9), generator=g)
    with pytest.raises(ValueError, match="grid"):
        sa_solver_sample(_policy(), _cond(1), time_grid(1, 1.0), tau=0.0, noise_window=(0.3, 0.9), generator=g)
    with pytest.raises(ValueError, match="finite"):
        adams_coefficients([-math.inf, 0.0], -math.inf, 0.5, 0.0, 1.0)
