import pytest
import torch

from awm_fast.algo.timesteps import discrete_boundaries, sample_train_timesteps, shift_time, time_grid


def test_time_grid_is_shifted_linspace():
    grid = time_grid(14, 3.0)
    u = torch.linspace(1, 0, 15, dtype=torch.float64)
    torch.testing.assert_close(grid, 3 * u / (1 + 2 * u))
    assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()


def test_official_boundaries():
    # linspace(1, floor(14 * 0.9) = 12, 7) = [1, 2.83, 4.67, 6.5, 8.33, 10.17, 12] -> ints
    assert discrete_boundaries(14, 6, 0.9, with_init=False) == [1, 2, 4, 6, 8, 10, 12]
    assert discrete_boundaries(14, 6, 0.9, with_init=True)[0] == 0
    with pytest.raises(ValueError, match="do not fit"):
        discrete_boundaries(10, 9, 0.9, with_init=False)


def test_discrete_wo_init_draws_one_grid_value_per_stratum(gen):
    grid = time_grid(14, 3.0)
    bounds = [1, 2, 4, 6, 8, 10, 12]
    seen = [set() for _ in range(6)]
    for _ in range(200):
        t = sample_train_timesteps("discrete_wo_init", 6, grid, shift=3.0, fraction=0.9, generator=gen)
        for j, value in enumerate(t.tolist()):
            idx = min(range(15), key=lambda k: abs(grid[k].item() - value))
            assert grid[idx].item() == value and bounds[j] <= idx < bounds[j + 1]
            seen[j].add(idx)
    assert all(len(s) == bounds[j + 1] - bounds[j] for j, s in enumerate(seen))


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
def test_continuous_modes_in_range(gen, mode):
    t = torch.cat([sample_train_timesteps(mode, 4, time_grid(10, 3.0), shift=3.0, fraction=0.9, generator=gen)
                   for _ in range(100)])
    assert (t >= 0.01).all() and (t <= 1).all()
    if mode == "uniform":  # stratified: strata stay ordered
        assert (t.reshape(100, 4).diff(dim=1) > 0).all()


def test_shift_identity_at_one():
    u = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, 1.0), u)
