"""The baselines' update loops against float64 transcriptions of the official behaviour, on a tiny LoRA transformer:
Flow-GRPO with CFG detaches the unconditional prediction; DiffusionNFT trains 9 of the 10 rollout timesteps of
each sample (a random permutation per sample)."""
import contextlib
import math

import torch

from awm_fast.algorithms.flow_grpo import sample_trajectory
from awm_fast.algorithms.update_loop import MicroBatchRNG
from awm_fast.config import Config, FlowGRPOConfig, SampleConfig, TrainConfig
from awm_fast.models.lora import EMA, POLICY, adapter_params
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import time_grid
from awm_fast.families.digits import POOLED_DIM, TEXT_DIM
from tests.models.tiny_configs import tiny_lora_policy
from tests.tolerances import tol
from tests.algorithms.updates import update_on

f64 = torch.float64
def _lora_policy() -> FlowPolicy:
    """The digits transformer in float64 with distinct non-zero "default" and "ema" LoRA weights."""
    return tiny_lora_policy(dtype=f64)


def _cond(n: int, gen: torch.Generator) -> Conditioning:
    return Conditioning(torch.randn(n, 2, TEXT_DIM, generator=gen), torch.randn(n, POOLED_DIM, generator=gen))


def _official_grpo_log_prob(policy, xs, mask, cond, null, grid, w, a, detach_uncond):
    """Float64 transcription of official Flow-GRPO `compute_log_prob` + `sde_step_with_logprob` (Euler-Maruyama):
    v = v_u + w (v_c - v_u) with v_u detached (or not), std = a sqrt(sigma / (1 - sigma~)),
    mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt, log p = mean over dims of the
    Gaussian log-density of x' with std sqrt(-dt)."""
    b, k = mask.nonzero(as_tuple=True)
    x, x_next = xs[b, k].to(f64), xs[b, k + 1].to(f64)
    view = (-1, 1, 1, 1)
    s, s_next = grid[k].to(f64).view(view), grid[k + 1].to(f64).view(view)
    t = grid[k].to(torch.float32)
    v_c = policy.velocity(xs[b, k], t, cond[b]).to(f64)
    with torch.no_grad() if detach_uncond else contextlib.nullcontext():
        v_u = policy.velocity(xs[b, k], t, null.repeat(len(b))).to(f64)
    v = v_u + w * (v_c - v_u)
    dt = s_next - s
    std = a * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
    mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * torch.sqrt(-dt)
    lp = -((x_next - mean) ** 2) / (2 * scale**2) - torch.log(scale) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=(1, 2, 3)), b


def _cfg_trajectory(seed: int, n: int, w: float, a: float):
    """A LoRA policy's Euler-Maruyama trajectory of n prompts with CFG w and noise a, and random advantages in
    [-1, 1]: (policy, cond, null_cond, grid, trajectory, advantages, the trained LoRA parameters)."""
    policy, gen = _lora_policy(), torch.Generator().manual_seed(seed)
    cond, null = _cond(n, gen), _cond(1, gen)
    grid = time_grid(4, 3.0)
    traj = sample_trajectory(policy, cond, grid, sampler="euler_maruyama", noise_level=a, generator=gen,
                             guidance_scale=w, null_cond=null)
    adv = torch.rand(n, generator=gen, dtype=f64) * 2 - 1
    return policy, cond, null, grid, traj, adv, list(adapter_params(policy.transformer, POLICY).values())


def test_flow_grpo_cfg_gradient_flows_through_the_conditional_branch_only():
    n, w, a = 4, 4.5, 0.7
    policy, cond, null, grid, traj, adv, params = _cfg_trajectory(1, n, w, a)

    def reference_grads(detach_uncond):
        lp, b = _official_grpo_log_prob(policy, traj.xs, traj.sde_mask, cond, null, grid, w, a, detach_uncond)
        loss = (-(5 * adv[b]) * torch.exp(lp - lp.detach())).mean()  # on-policy: r == 1, clip inactive
        grads = torch.autograd.grad(loss, params)
        return lp.detach(), torch.cat([g.flatten() for g in grads])

    old_lp, ref = reference_grads(detach_uncond=True)
    _, ref_no_detach = reference_grads(detach_uncond=False)
    assert (ref - ref_no_detach).norm() > 0.05 * ref.norm()  # the uncond branch would carry a sizeable gradient
    b, k = traj.sde_mask.nonzero(as_tuple=True)
    traj.log_probs = traj.log_probs.clone()
    traj.log_probs[b, k] = old_lp.float()
    before = [p.detach().clone() for p in params]
    cfg = Config(train=TrainConfig(algorithm="flow_grpo", micro_batch=n, max_grad_norm=1e12),
                 sample=SampleConfig(sampler="euler_maruyama", noise_level=a, guidance_scale=w),
                 flow_grpo=FlowGRPOConfig(optimizer_steps=1, beta=0.0, clip_range=0.5))
    stats = update_on(cfg, policy, traj.xs[:, -1], cond, adv, grid, MicroBatchRNG(1, 0),
                      torch.optim.SGD(params, lr=1.0), params, kept=traj, null_cond=null)
    assert stats.skipped == 0 and stats.losses["clipfrac_first"] == 0.0
    got = -torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, before)])  # SGD lr 1: delta = -grad
    torch.testing.assert_close(got, ref, **tol(torch.float32))


def test_flow_grpo_trains_only_the_nonzero_advantage_samples():
    """Official train_sd3.py drops the A = 0 samples before the update: the 2 informative samples of 4, in the
    same 2 micro-batches (now of 1 row each), give the gradient of the mean loss over those 2 alone (twice the
    gradient of a mean over all 4)."""
    n, w, a = 4, 4.5, 0.7
    policy, cond, null, grid, traj, adv, params = _cfg_trajectory(2, n, w, a)
    adv[[1, 2]] = 0.0
    lp, b = _official_grpo_log_prob(policy, traj.xs, traj.sde_mask, cond, null, grid, w, a, detach_uncond=True)
    informative = adv[b] != 0
    loss = (-(5 * adv[b]) * torch.exp(lp - lp.detach()))[informative].mean()  # on-policy: r == 1
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    traj.log_probs = traj.log_probs.clone()
    traj.log_probs[traj.sde_mask] = lp.detach().float()
    before = [p.detach().clone() for p in params]
    cfg = Config(train=TrainConfig(algorithm="flow_grpo", micro_batch=2, max_grad_norm=1e12),
                 sample=SampleConfig(sampler="euler_maruyama", noise_level=a, guidance_scale=w),
                 flow_grpo=FlowGRPOConfig(optimizer_steps=1, beta=0.0, clip_range=0.5))
    stats = update_on(cfg, policy, traj.xs[:, -1], cond, adv, grid, MicroBatchRNG(1, 0),
                      torch.optim.SGD(params, lr=1.0), params, kept=traj, null_cond=null)
    assert stats.skipped == 0 and stats.losses["kept"] == 0.5
    got = -torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, before)])  # SGD lr 1: delta = -grad
    torch.testing.assert_close(got, ref, **tol(torch.float32))


def test_awm_trains_every_sample_even_with_zero_advantage(monkeypatch):
    """Official AWM does not filter: a flat group's samples stay in their micro-batches (their KL rows count)."""
    from awm_fast.algorithms.awm import AWM

    policy, gen = _lora_policy(), torch.Generator().manual_seed(3)
    n = 4
    x0, cond = torch.randn(n, 1, 8, 8, generator=gen, dtype=f64), _cond(n, gen)
    adv = torch.tensor([0.5, 0.0, -0.5, 0.0], dtype=f64)
    seen, real = [], AWM.micro_batch_loss

    def spy(self, policy, x0, cond, advantages, grid, g, backend="auto"):
        seen.append(advantages.tolist())
        return real(self, policy, x0, cond, advantages, grid, g, backend)

    monkeypatch.setattr(AWM, "micro_batch_loss", spy)
    params = list(adapter_params(policy.transformer, POLICY).values())
    cfg = Config(train=TrainConfig(algorithm="awm", micro_batch=2, num_timesteps=2, shared_batch=False))
    stats = update_on(cfg, policy, x0, cond, adv, time_grid(6, 3.0), MicroBatchRNG(1, 0),
                      torch.optim.SGD(params, lr=1.0), params)
    assert seen == [[0.5, 0.0], [-0.5, 0.0]] and stats.skipped == 0 and "kept" not in stats.losses


def test_nft_trains_nine_distinct_rollout_timesteps_per_sample():
    policy, gen = _lora_policy(), torch.Generator().manual_seed(2)
    seen = []
    velocity = policy.velocity

    def spy(x, t, cond, adapter=POLICY):
        seen.append((adapter, t.detach().clone()))
        return velocity(x, t, cond, adapter)

    policy.velocity = spy
    n, mb = 16, 8
    grid = time_grid(10, 3.0)
    latents = torch.randn(n, 1, 8, 8, generator=gen)
    params = list(adapter_params(policy.transformer, POLICY).values())
    stats = update_on(Config(train=TrainConfig(algorithm="nft", micro_batch=mb)), policy, latents, _cond(n, gen),
                      torch.rand(n, generator=gen) * 2 - 1, grid, MicroBatchRNG(2, 0), torch.optim.SGD(params, lr=0.1),
                      params)
    assert stats.skipped == 0 and stats.grad_norm > 0
    assert [adapter for adapter, _ in seen] == [EMA, None, POLICY] * (n // mb)
    times = grid[:-1].float()
    missing = set()
    for i in range(n // mb):
        t_rows = [t for _, t in seen[3 * i:3 * i + 3]]
        assert all(torch.equal(t, t_rows[0]) for t in t_rows)  # policy, old and reference see the same rows
        assert t_rows[0].shape == (9 * mb,)  # int(10 * 0.99) = 9 timesteps per sample, slot-major rows
        per_sample = t_rows[0].view(9, mb).T
        for row in per_sample:
            idx = (row[:, None] == times[None, :]).nonzero()[:, 1]
            assert len(idx) == 9 and len(set(idx.tolist())) == 9  # 9 distinct rollout timesteps (t = 0 never)
            missing |= set(range(10)) - set(idx.tolist())
    assert len(missing) > 1  # a permutation per sample: not the same left-out timestep for every sample


def test_nft_rolls_out_the_old_policy_with_dpm2():
    from awm_fast.config import load_config
    from awm_fast.sampling.dpm_solver import dpm2_sample
    from awm_fast.sampling.rollout import sample_latents
    from awm_fast.algorithms import get_algorithm

    policy, gen = _lora_policy(), torch.Generator().manual_seed(3)
    cond, grid = _cond(3, gen), time_grid(10, 3.0)
    cfg = load_config(None, ["train.algorithm=nft"])
    assert cfg.nft.sampler == "dpm2" and cfg.nft.timestep_fraction == 0.99
    sampled = get_algorithm(cfg).sample(policy, cond, grid, torch.Generator().manual_seed(4), None)
    x = sampled.latents
    assert sampled.kept is None
    torch.testing.assert_close(x, dpm2_sample(policy, cond, grid, generator=torch.Generator().manual_seed(4),
                                              adapter=EMA), **tol(f64))
    euler, _ = sample_latents(policy, cond, grid, sampler="ode", noise_level=0.0,
                              generator=torch.Generator().manual_seed(4), adapter=EMA)
    assert (x - euler).abs().max() > 1e-3  # a different solver than the Euler ODE it used to be
    x_ode = get_algorithm(load_config(None, ["train.algorithm=nft", "nft.sampler=ode"])).sample(
        policy, cond, grid, torch.Generator().manual_seed(4), None).latents
    torch.testing.assert_close(x_ode, euler, **tol(f64))
