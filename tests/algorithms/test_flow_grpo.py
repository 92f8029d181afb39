"""Flow-GRPO loss against hand-computed cases, and the step std against the op's actual noise scale."""
import math

import pytest
import torch

from awm_fast.algorithms.flow_grpo import euler_maruyama_final, flow_grpo_loss, informative_samples, kl_std
from awm_fast.ops import sde_step

f64 = torch.float64


def test_clipped_surrogate_by_hand():
    # rows: r = 1 (A = 2); r = 1.5 > 1 + c with A = -1 (unclipped branch wins); r = 1.5 with A = 1 (clipped wins)
    lp = torch.tensor([0.0, math.log(1.5), math.log(1.5)], dtype=f64, requires_grad=True)
    out = flow_grpo_loss(lp, torch.zeros(3, dtype=f64), torch.tensor([2.0, -1.0, 1.0], dtype=f64), clip_range=0.2)
    assert out.loss.item() == pytest.approx((-2.0 + 1.5 - 1.2) / 3)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    out.loss.backward()
    # d/dl of -A r = -A r where the unclipped branch is active, 0 where the clipped one is
    torch.testing.assert_close(lp.grad, torch.tensor([-2.0, 1.5, 0.0], dtype=f64) / 3)


def test_kl_in_mean_space_by_hand():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=f64)
    mean_ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=f64)
    std = torch.tensor([0.5, 1.0], dtype=f64)
    zero = torch.zeros(2, dtype=f64)
    out = flow_grpo_loss(zero, zero, zero, beta=0.1, mean=mean, mean_ref=mean_ref, std=std)
    # row 0: mean(1, 4) / (2 * 0.25) = 5; row 1: mean(0, 9) / 2 = 2.25
    assert out.kl.item() == pytest.approx((5 + 2.25) / 2)
    assert out.loss.item() == pytest.approx(0.1 * 3.625)
    assert out.policy_loss.item() == 0.0


def test_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="mean, mean_ref and std"):
        flow_grpo_loss(x, x, x, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        flow_grpo_loss(x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="clip_range"):
        flow_grpo_loss(x, x, x, clip_range=0.0)
    with pytest.raises(TypeError):
        flow_grpo_loss(x, [0.0, 0.0, 0.0], x)
    with pytest.raises(ValueError, match="stochastic"):
        kl_std("ode", torch.ones(1), torch.ones(1), 0.7)


def test_kl_std_by_hand():
    # the official std_dev_t: a sqrt(sigma / (1 - sigma~)) for Euler-Maruyama (sigma~ = sigma' at sigma = 1), without
    # the sqrt(-dt) of the step's noise; sigma' sin(a pi / 2) for CPS
    s, sn = torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.8])
    torch.testing.assert_close(kl_std("euler_maruyama", s, sn, 0.7), torch.tensor([0.7, 0.7 * math.sqrt(5)], dtype=f64))
    torch.testing.assert_close(kl_std("cps", s, sn, 0.8), sn.double() * math.sin(0.4 * math.pi))


@pytest.mark.parametrize("kind", ["euler_maruyama", "cps"])
def test_kl_std_against_the_noise_scale_of_sde_step(gen, kind):
    x, v, noise = (torch.randn(3, 2, 4, 4, generator=gen, dtype=f64) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3], dtype=f64), torch.tensor([0.9, 0.5, 0.1], dtype=f64)
    step = sde_step(x, v, sigma, sigma_next, noise=noise, noise_level=0.8, kind=kind, backend="torch")
    std = kl_std(kind, sigma, sigma_next, 0.8)
    if kind == "euler_maruyama":
        std = std * (sigma - sigma_next).sqrt()
    torch.testing.assert_close(step.x_next - step.mean, std.view(-1, 1, 1, 1) * noise)


def test_informative_samples_as_the_official_filter(gen):
    """Official train_sd3.py: keep A != 0; if their count k is not a multiple of the M batches (or is 0), add
    M - k mod M random zero-advantage samples."""
    adv = torch.rand(12, generator=gen, dtype=f64) - 0.5
    adv[[1, 4, 5, 9]] = 0.0
    assert informative_samples(adv, 4, gen).tolist() == [0, 2, 3, 6, 7, 8, 10, 11]  # k = 8: nothing added
    picked = set()
    for _ in range(40):
        kept = informative_samples(adv, 3, gen)  # k = 8 -> 9: one of the four zeros joins
        assert kept.numel() == 9 and kept.tolist() == sorted(kept.tolist())
        extra = set(kept.tolist()) - {0, 2, 3, 6, 7, 8, 10, 11}
        assert len(extra) == 1 and extra <= {1, 4, 5, 9}
        picked |= extra
    assert picked == {1, 4, 5, 9}  # drawn at random
    assert informative_samples(torch.zeros(12, dtype=f64), 4, gen).numel() == 4  # all flat: one per batch
    assert informative_samples(adv.abs() + 0.1, 4, gen).tolist() == list(range(12))
    with pytest.raises(ValueError, match="num_batches=13"):
        informative_samples(adv, 13, gen)


def test_euler_maruyama_final_is_the_official_step_to_zero(gen):
    x, v, xi = (torch.randn(3, 2, 4, 4, generator=gen, dtype=f64) for _ in range(3))
    for s, a in ((0.3, 0.7), (0.05, 1.0)):
        std, dt = a * math.sqrt(s / (1 - s)), -s
        mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt  # official formula
        torch.testing.assert_close(euler_maruyama_final(x, v, s, a, xi), mean + std * math.sqrt(-dt) * xi)
    # sigma = 1 (a one-step grid): official sigma~ = sigma_next = 0, so std = a
    torch.testing.assert_close(euler_maruyama_final(x, v, 1.0, 0.7, xi), x * (1 - 0.49 / 2) - v + 0.7 * xi)
    with pytest.raises(ValueError, match="sigma=0.0"):
        euler_maruyama_final(x, v, 0.0, 0.7, xi)
