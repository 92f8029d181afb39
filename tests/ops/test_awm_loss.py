"""The torch (float64) AWM loss: hand-computed values, gradcheck, option coverage, bad input."""
import math

import pytest
import torch

from awm_fast.ops import AWMLoss, awm_loss
from awm_fast.ops.awm_loss_torch import KL_WEIGHTINGS, WEIGHTINGS


def _inputs(gen, rows=5, shape=(3, 4), dtype=torch.float64):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    return dict(
        v=mk(rows, *shape), target=mk(rows, *shape), t=torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05,
        advantages=mk(rows).clamp(-1, 1), v_ref=mk(rows, *shape), v_ema=mk(rows, *shape),
    )


def test_hand_computed_uniform_case():
    v = torch.tensor([[1.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    a = torch.tensor([1.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    out = awm_loss(v, u, t, a, v_ref=ref, beta=0.1, weighting="uniform", backend="torch")
    # mse = [(1 + 4) / 2, (1 + 1) / 2] = [2.5, 1]; on-policy ratio 1 -> policy = -A
    assert out.mse.tolist() == pytest.approx([2.5, 1.0])
    assert out.log_prob.tolist() == pytest.approx([-2.5, -1.0])
    # kl = [(0 + 4) / 2, (0 + 4) / 2] = [2, 2]
    assert out.kl.tolist() == pytest.approx([2.0, 2.0])
    assert out.loss.item() == pytest.approx((-1.0 + 0.5) / 2 + 0.1 * 2.0)
    assert out.clipfrac.item() == 0.0


@pytest.mark.parametrize("weighting,expected", [
    ("t", -0.5 * 2.5), ("t2", -0.25 * 2.5),
    ("huber", -0.5 * (math.sqrt(2.5 + 1e-10) - 1e-5)),
    ("ghuber", -(0.5 / 0.25) * ((2.5 + 1e-10) ** 0.25 - (1e-10) ** 0.25)),
])
def test_hand_computed_weightings(weighting, expected):
    v = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    out = awm_loss(v, u, torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                   weighting=weighting, backend="torch")
    assert out.log_prob.item() == pytest.approx(expected, rel=1e-6)


def test_off_policy_ratio_and_clip():
    v = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    u = torch.zeros(2, 1, dtype=torch.float64) + 0.0
    t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    a = torch.tensor([1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([-1.0 - math.log(3.0), -1.0], dtype=torch.float64)  # l = -1 (uniform)
    out = awm_loss(v, u, t, a, old_log_prob=old, weighting="uniform", clip_range=0.5, backend="torch")
    # row 0: r = 3 -> max(-3, -1.5) = -1.5 (clipped); row 1: r = 1 -> max(1, 1) = 1
    assert out.loss.item() == pytest.approx((-1.5 + 1.0) / 2)
    assert out.clipfrac.item() == pytest.approx(0.5)


def test_elbo_kl_weight():
    t = torch.tensor([0.5], dtype=torch.float64)
    v = torch.tensor([[2.0]], dtype=torch.float64)
    out = awm_loss(v, v.clone(), t, torch.ones(1, dtype=torch.float64), v_ref=torch.zeros_like(v) + 1.0,
                   kl_weighting="elbo", backend="torch")
    std2 = 0.49 * 0.5 / 0.5
    assert out.kl.item() == pytest.approx(1.0 / (2 * std2))


def test_on_policy_gradient_matches_closed_form(gen):
    x = _inputs(gen, rows=4, shape=(6,))
    v = x["v"].clone().requires_grad_()
    beta, ema_beta, p = 0.3, 0.7, 0.25
    out = awm_loss(v, x["target"], x["t"], x["advantages"], v_ref=x["v_ref"], v_ema=x["v_ema"], beta=beta,
                   ema_beta=ema_beta, backend="torch")
    out.loss.backward()
    rows, dims = v.shape
    mse = ((x["v"] - x["target"]) ** 2).mean(1, keepdim=True)
    a, t = x["advantages"][:, None], x["t"][:, None]
    expected = (-(a / rows) * (-t * (mse + 1e-10) ** (p - 1)) * 2 * (x["v"] - x["target"]) / dims
                + beta * 2 * (x["v"] - x["v_ref"]) / (rows * dims) + ema_beta * 2 * (x["v"] - x["v_ema"]) / (rows * dims))
    torch.testing.assert_close(v.grad, expected)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kl_weighting", KL_WEIGHTINGS)
@pytest.mark.parametrize("ratio_mode", ["exp_first", "sum_first"])
def test_gradcheck_every_option(gen, weighting, kl_weighting, ratio_mode):
    x = _inputs(gen, rows=4, shape=(3,))
    old = -torch.rand(4, generator=gen, dtype=torch.float64) * 0.5

    def f(v):
        return awm_loss(v, x["target"], x["t"], x["advantages"], v_ref=x["v_ref"], v_ema=x["v_ema"],
                        old_log_prob=old, beta=0.2, ema_beta=0.5, weighting=weighting, kl_weighting=kl_weighting,
                        clip_range=10.0, ratio_mode=ratio_mode, num_timesteps=2, backend="torch").loss

    assert torch.autograd.gradcheck(f, (x["v"].clone().requires_grad_(),))


def test_sum_first_equals_exp_first_on_policy(gen):
    x = _inputs(gen, rows=6, shape=(5,))
    grads = []
    for mode in ("exp_first", "sum_first"):
        v = x["v"].clone().requires_grad_()
        adv = x["advantages"].reshape(3, 2)[0].repeat(3)  # same advantage for the 3 timesteps of a sample
        awm_loss(v, x["target"], x["t"], adv, ratio_mode=mode, num_timesteps=3, backend="torch").loss.backward()
        grads.append(v.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_module_wrapper_matches_function(gen):
    x = _inputs(gen)
    mod = AWMLoss(beta=0.1, ema_beta=1.0, backend="torch")
    a = mod(x["v"], x["target"], x["t"], x["advantages"], v_ref=x["v_ref"], v_ema=x["v_ema"]).loss
    b = awm_loss(x["v"], x["target"], x["t"], x["advantages"], v_ref=x["v_ref"], v_ema=x["v_ema"], beta=0.1,
                 ema_beta=1.0, backend="torch").loss
    assert a.item() == b.item()


@pytest.mark.parametrize("change,match", [
    (dict(target=torch.zeros(5, 3, 5)), "target has shape"),
    (dict(t=torch.rand(4)), "t must have shape"),
    (dict(advantages=torch.tensor([1.0, float("nan"), 0, 0, 0])), "advantages contain NaN"),
    (dict(weighting="l2"), "weighting='l2'"),
    (dict(kl_weighting="x"), "kl_weighting='x'"),
    (dict(backend="cuda_magic"), "backend='cuda_magic'"),
    (dict(num_timesteps=2), "num_timesteps=2"),
])
def test_bad_input_raises_value_error(gen, change, match, monkeypatch):
    monkeypatch.setenv("AWM_FAST_DEBUG_CHECKS", "1")  # the value check (NaN advantages) runs under the switch
    x = _inputs(gen, rows=5, shape=(3, 4), dtype=torch.float32)
    kwargs = dict(v=x["v"], target=x["target"], t=x["t"].float(), advantages=x["advantages"])
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        awm_loss(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_nan_advantages_without_the_debug_switch_give_a_nan_loss(gen, monkeypatch, backend):
    """Off the hot path: without AWM_FAST_DEBUG_CHECKS=1 no value is read back; the NaN reaches the loss (and the
    trainer's non-finite guard)."""
    monkeypatch.delenv("AWM_FAST_DEBUG_CHECKS", raising=False)
    x = _inputs(gen, rows=5, shape=(3, 4), dtype=torch.float32)
    adv = x["advantages"].clone()
    adv[1] = float("nan")
    out = awm_loss(x["v"], x["target"], x["t"].float(), adv, backend=backend)
    assert torch.isnan(out.loss)


def test_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="v must be a floating tensor"):
        awm_loss(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("ratio_mode", ["exp_first", "sum_first"])
def test_gradcheck_through_the_clipped_branch(gen, ratio_mode):
    """test_gradcheck_every_option's clip_range=10 never clips; here the old log-probs sit at log r = -d from the
    current ones (d from -0.6 to 0.6; one timestep per sample, so a row is a ratio), so with c = 0.15 two rows are inside the clip range and six outside (well
    away from the kinks): the gradient of max(-A r, -A clip(r)) is checked on both branches, and it differs from
    the unclipped loss's gradient (the clip acts on it)."""
    x = _inputs(gen, rows=8, shape=(3,))

    def out(v, old, clip_range):
        return awm_loss(v, x["target"], x["t"], x["advantages"], v_ref=x["v_ref"], v_ema=x["v_ema"],
                        old_log_prob=old, beta=0.2, ema_beta=0.5, clip_range=clip_range, ratio_mode=ratio_mode,
                        num_timesteps=1, backend="torch")

    current = out(x["v"], torch.zeros(8, dtype=torch.float64), 10.0).log_prob.detach().double()
    offsets = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64)[torch.randperm(8, generator=gen)]
    old = current + offsets
    assert float(out(x["v"], old, 0.15).clipfrac) == 0.75
    v = x["v"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: out(w, old, 0.15).loss, (v,))
    clipped = torch.autograd.grad(out(v, old, 0.15).loss, v)[0]
    free = torch.autograd.grad(out(v, old, 10.0).loss, v)[0]
    assert not torch.allclose(clipped, free)
