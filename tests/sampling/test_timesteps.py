import pytest
import torch

from awm_fast.sampling.timesteps import (discrete_boundaries, dynamic_grid, flux_mu, sample_train_timesteps,
                                         scheduler_grid, sd3_grid, shift_time, time_grid)


SD35_N14 = [1, .97306, .94305, .90941, .87145, .82828, .77874, .72131, .65394, .57381, .47691, .35737, .20620, .00893, 0]


def test_sd3_grid_is_the_schedulers():
    """The grid of diffusers' FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(N), read off the scheduler and
    transcribed in float64: shift(linspace(1, shift(1/1000), N)) then 0 (not shift(linspace(1, 0, N + 1)))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for n in (10, 14, 40):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(n)
        torch.testing.assert_close(sd3_grid(n, 3.0), sched.sigmas.double(), atol=1e-7, rtol=0)
        torch.testing.assert_close(scheduler_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), n), sched.sigmas.double())
    torch.testing.assert_close(time_grid(14, 3.0), torch.tensor(SD35_N14, dtype=torch.float64), atol=6e-6, rtol=0)
    assert time_grid(14, 3.0)[-2] < 0.01  # the old formula's last non-zero value was 0.1875


def test_flux_grid_uses_dynamic_shifting():
    """FLUX.1's scheduler config: sigmas = linspace(1, 1/N, N) shifted by mu(image sequence length), as FluxPipeline
    calls set_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
    for n, seq_len in ((28, 1024), (14, 4096), (10, 256)):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert flux_mu(seq_len) == pytest.approx(mu)
        sched = FlowMatchEulerDiscreteScheduler(**config)
        sched.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).tolist(), mu=mu)
        torch.testing.assert_close(scheduler_grid(FlowMatchEulerDiscreteScheduler(**config), n, image_seq_len=seq_len),
                                   sched.sigmas.double())
        torch.testing.assert_close(dynamic_grid(n, mu), sched.sigmas.double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sequence length"):
        scheduler_grid(FlowMatchEulerDiscreteScheduler(**config), 10)


def test_scheduler_grid_leaves_the_pipeline_scheduler_alone():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    before = sched.sigmas.clone()
    scheduler_grid(sched, 14)
    assert torch.equal(sched.sigmas, before)


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


def _unshift(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t / (shift - (shift - 1) * t)


def test_uniform_is_official_per_sample_strata_of_0_2_to_1(gen):
    """Official `uniform`: for each sample, one value in each of T strata of [0.2, 1], in a random order, shifted."""
    t = torch.stack([sample_train_timesteps("uniform", 4, time_grid(10, 3.0), shift=3.0, fraction=0.9, generator=gen,
                                            batch=3) for _ in range(200)])  # (200, T, B)
    assert t.shape == (200, 4, 3)
    u = _unshift(t, 3.0)
    stratum = ((u - 0.2) / 0.8 * 4).floor()
    assert torch.equal(stratum.sort(dim=1).values, torch.arange(4.0).view(1, 4, 1).expand(200, 4, 3))
    assert not torch.equal(t[:, :, 0], t[:, :, 1])  # per sample, not shared
    assert 0.15 < (stratum[:, 0] == 0).float().mean().item() < 0.35  # shuffled: stratum 0 first ~1 / 4 of the time


def test_logit_normal_is_official_stratified_quantiles(gen):
    """Official `logit_normal`: T stratified normal quantiles (shuffled), sigmoid, shifted, clamped >= 0.01; one draw
    per micro-batch."""
    normal = torch.distributions.Normal(0.0, 1.0)
    draws = torch.stack([sample_train_timesteps("logit_normal", 4, time_grid(10, 3.0), shift=3.0, fraction=0.9,
                                                generator=gen, batch=2) for _ in range(200)])
    assert torch.equal(draws[:, :, 0], draws[:, :, 1])
    q = normal.cdf(torch.logit(_unshift(draws[:, :, 0], 3.0)))
    assert torch.equal((q * 4).floor().sort(dim=1).values, torch.arange(4.0).expand(200, 4))
    assert (draws >= 0.01).all() and (draws < 1).all()


def test_shift_identity_at_one():
    u = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, 1.0), u)
