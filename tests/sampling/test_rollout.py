"""Rollout loops on an analytic velocity field: a point mass at x* has v(x, t) = (x - x*) / t."""
import pytest
import torch

from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.timesteps import time_grid


class PointMassField(torch.nn.Module):
    """Exact flow-matching velocity for data = {x*}; the conditioning shifts x* by its pooled value."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        t = (timestep / 1000).view(-1, 1, 1, 1)
        self.calls.append(float(t.flatten()[0]))
        x_star = self.target + pooled_projections[:, :1, None, None]
        return ((hidden_states - x_star) / t,)


def _policy(target):
    return FlowPolicy(PointMassField(target), encode=None, decode=None, latent_shape=tuple(target.shape),
                      device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("sampler", ["ode", "euler_maruyama", "cps"])
def test_every_sampler_lands_on_the_point_mass(gen, sampler):
    target = torch.randn(1, 4, 4, generator=gen)
    policy = _policy(target)
    cond = Conditioning(torch.zeros(3, 2, 8), torch.zeros(3, 8))
    x0, log_prob = sample_latents(policy, cond, time_grid(12, 3.0), sampler=sampler, noise_level=0.7,
                                  generator=gen, adapter="default")
    torch.testing.assert_close(x0, target.expand(3, -1, -1, -1), atol=1e-5, rtol=1e-5)
    assert policy.transformer.calls[0] == 1.0 and len(policy.transformer.calls) == 12
    if sampler == "ode":
        assert torch.equal(log_prob, torch.zeros(3))
    else:
        assert torch.isfinite(log_prob).all() and (log_prob != 0).all()


def test_ode_follows_the_exact_straight_path(gen):
    target = torch.randn(1, 2, 2, generator=gen)
    policy = _policy(target)
    cond = Conditioning(torch.zeros(1, 1, 4), torch.zeros(1, 4))
    x1 = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    grid = time_grid(6, 1.0)
    for k in range(1, 6):  # stopping after k steps must give x_t = (1 - t) x* + t x1 at t = grid[k]
        x, _ = sample_latents(policy, cond, grid[:k + 1], sampler="ode", noise_level=0.0,
                              generator=torch.Generator().manual_seed(5))
        t = grid[k].item()
        torch.testing.assert_close(x, (1 - t) * target + t * x1, atol=1e-5, rtol=1e-5)


def test_classifier_free_guidance_extrapolates_from_the_empty_prompt(gen):
    target = torch.zeros(1, 2, 2)
    policy = _policy(target)
    cond = Conditioning(torch.zeros(2, 1, 4), torch.ones(2, 4))  # conditional x* = 1
    null = Conditioning(torch.zeros(1, 1, 4), torch.zeros(1, 4))  # unconditional x* = 0
    x0, _ = sample_latents(policy, cond, time_grid(8, 3.0), sampler="ode", noise_level=0.0, generator=gen,
                           guidance_scale=3.0, null_cond=null)
    torch.testing.assert_close(x0, torch.full((2, 1, 2, 2), 3.0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="null_cond"):
        sample_latents(policy, cond, time_grid(8, 3.0), sampler="ode", noise_level=0.0, generator=gen,
                       guidance_scale=3.0)
