"""Flow-GRPO trajectories: stored log-probs are the ones the log-prob mode of sde_step recomputes."""
import pytest
import torch

from awm_fast.algorithms.flow_grpo import sample_trajectory, sde_window_mask
from awm_fast.ops import sde_step
from awm_fast.sampling.timesteps import time_grid
from tests.sampling.test_rollout import _policy
from awm_fast.models.policy import Conditioning


@pytest.mark.parametrize("sampler,window", [("euler_maruyama", 0), ("cps", 3)])
def test_stored_log_probs_match_recomputation(gen, sampler, window):
    target = torch.randn(1, 4, 4, generator=gen)
    policy = _policy(target)
    cond = Conditioning(torch.zeros(5, 2, 8), torch.zeros(5, 8))
    grid = time_grid(10, 3.0)
    traj = sample_trajectory(policy, cond, grid, sampler=sampler, noise_level=0.8, generator=gen, sde_window=window)
    assert traj.xs.shape == (5, 11, 1, 4, 4) and traj.log_probs.shape == traj.sde_mask.shape == (5, 10)
    assert int(traj.sde_mask[0].sum()) == (9 if window == 0 else 3) and not traj.sde_mask[:, -1].any()
    if sampler == "cps":  # the CPS step to 0 has no noise (and a window leaves the last step an Euler step)
        torch.testing.assert_close(traj.xs[:, -1], target.expand(5, -1, -1, -1), atol=1e-5, rtol=1e-5)
    else:  # Euler-Maruyama without a window: the last step adds its noise, as the official rollout does
        assert (traj.xs[:, -1] - target).abs().max() > 1e-3
    for k in range(10 if sampler == "cps" else 9):
        x = traj.xs[:, k]
        v = policy.velocity(x, torch.full((5,), grid[k].item()), cond)
        kind = sampler if traj.sde_mask[0, k] else "ode"
        lp = sde_step(x, v, grid[k].item(), grid[k + 1].item(), noise_level=0.8, kind=kind,
                      x_next=traj.xs[:, k + 1]).log_prob
        torch.testing.assert_close(lp, traj.log_probs[:, k], atol=1e-4, rtol=1e-4)
        if kind == "ode":
            torch.testing.assert_close(traj.xs[:, k + 1], x + (grid[k + 1] - grid[k]).float() * v)


def test_window_mask():
    g = torch.Generator().manual_seed(0)
    counts = {}
    for _ in range(300):
        m = sde_window_mask(10, 3, g)
        idx = m.nonzero().flatten().tolist()
        assert len(idx) == 3 and idx == list(range(idx[0], idx[0] + 3))
        counts[idx[0]] = counts.get(idx[0], 0) + 1
    # official Flow-GRPO-Fast: start = randint(0, N // 2 - W) inclusive: {0, 1, 2} for N = 10, W = 3, uniform
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 70, counts
    assert {int(sde_window_mask(14, 3, g).nonzero()[0]) for _ in range(200)} == set(range(0, 5))
    assert sde_window_mask(6, 3, g).tolist() == [True, True, True, False, False, False]  # N // 2 - W = 0
    assert sde_window_mask(4, 0, g).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="window"):
        sde_window_mask(4, 4, g)
    with pytest.raises(ValueError, match="window 6 must be in \\[0, 5\\]"):
        sde_window_mask(10, 6, g)  # the old bound min(N // 2, N - 1 - W) allowed W up to N - 1


def test_last_euler_maruyama_step_adds_the_official_noise(gen):
    """Official sde_step_with_logprob at the last step (sigma -> 0, dt = -sigma): std = a sqrt(sigma / (1 - sigma)),
    mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt, x' = mean + std sqrt(-dt) xi."""
    target = torch.randn(1, 8, 8, generator=gen)
    policy = _policy(target)
    cond = Conditioning(torch.randn(64, 2, 8, generator=gen), torch.randn(64, 8, generator=gen))
    grid, a = time_grid(4, 3.0), 0.7
    traj = sample_trajectory(policy, cond, grid, sampler="euler_maruyama", noise_level=a, generator=gen)
    x, s = traj.xs[:, -2].double(), grid[-2].item()
    v = policy.velocity(traj.xs[:, -2], torch.full((64,), s), cond).double()
    std, dt = a * (s / (1 - s)) ** 0.5, -s
    mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    xi = (traj.xs[:, -1].double() - mean) / (std * (-dt) ** 0.5)
    assert abs(float(xi.mean())) < 0.1 and 0.9 < float(xi.std()) < 1.1  # 4096 standard normals
    assert torch.equal(traj.log_probs[:, -1], torch.zeros(64)) and not traj.sde_mask[:, -1].any()  # never trained
    windowed = sample_trajectory(policy, cond, grid, sampler="euler_maruyama", noise_level=a, generator=gen,
                                 sde_window=1)  # Flow-GRPO-Fast: noise 0 outside the window, so an Euler step
    x = windowed.xs[:, -2]
    v = policy.velocity(x, torch.full((64,), s), cond)
    torch.testing.assert_close(windowed.xs[:, -1], x - s * v)
