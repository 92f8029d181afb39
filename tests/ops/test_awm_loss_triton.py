"""The Triton AWM loss against the float64 torch reference: values and dLoss/dv for every option and dtype.

Runs in the Triton interpreter on CPU (see conftest.py) and on the GPU when there is one. Every launcher
buffer is poisoned with NaN and tiles are tiny, so rows take several chunks and several tiles per chunk.
"""
import pytest
import torch

from awm_fast.ops import awm_loss
from awm_fast.ops.awm_loss_torch import KL_WEIGHTINGS, WEIGHTINGS
from tests.tolerances import tol

pytestmark = pytest.mark.usefixtures("poison_and_tiny_tiles")
STATS = ("log_prob", "mse", "kl", "kl_ema", "clipfrac")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _inputs(gen, device, rows, shape, dtypes=(F32, F32, F32, F32)):
    """Random v, target, v_ref, v_ema (dtypes in that order), t in (0.05, 0.95), |A| <= 1 (never zeros)."""
    mk = lambda dtype: torch.randn(rows, *shape, generator=gen, dtype=torch.float64).to(device, dtype)  # noqa: E731
    v, target, v_ref, v_ema = (mk(d) for d in dtypes)
    t = (torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(device, F32)
    adv = (torch.rand(rows, generator=gen, dtype=torch.float64) * 2 - 1).to(device, F32)
    return dict(v=v, target=target, t=t, advantages=adv, v_ref=v_ref, v_ema=v_ema)


def _off_policy_old(x, gen, spread, **options):
    """old_log_prob = the current log_prob shifted per sample by +-spread (even samples, clipped when
    spread > clip_range) or +-spread / 10 (odd samples, unclipped), plus a little noise."""
    lp = awm_loss(**x, backend="torch", **options).log_prob
    samples = lp.shape[0] // options.get("num_timesteps", 1)
    sample = torch.arange(lp.shape[0]) % samples
    sign = torch.randint(0, 2, (lp.shape[0],), generator=gen) * 2 - 1
    shift = torch.where(sample % 2 == 0, spread, spread / 10) * sign
    shift = shift + 0.01 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    return lp + shift.to(lp.device, lp.dtype)


def _run(x, backend, grad_scale=1.0, **options):
    """Forward + backward; the reference gets v in float64 so its gradient is not rounded."""
    v = (x["v"].double() if backend == "torch" else x["v"]).detach().requires_grad_()
    out = awm_loss(**{**x, "v": v}, backend=backend, **options)
    (out.loss * grad_scale).backward()
    return out, v.grad


def _compare(x, gen=None, grad_scale=1.0, **options):
    ref, ref_grad = _run(x, "torch", grad_scale, **options)
    out, grad = _run(x, "triton", grad_scale, **options)
    assert out.loss.dtype == F32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.double(), ref.loss, **tol(F32))
    for name in STATS:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol(F32))
    assert grad.dtype == x["v"].dtype and grad.shape == x["v"].shape
    torch.testing.assert_close(grad.double(), ref_grad, **tol(x["v"].dtype))
    return ref


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kl_weighting", KL_WEIGHTINGS)
@pytest.mark.parametrize("policy", ["on", "off_exp_first", "off_sum_first"])
def test_every_option_matches_reference(gen, device, weighting, kl_weighting, policy):
    x = _inputs(gen, device, rows=8, shape=(3, 13))
    options = dict(beta=0.3, ema_beta=0.7, weighting=weighting, kl_weighting=kl_weighting, clip_range=0.2)
    if policy == "off_sum_first":
        options.update(ratio_mode="sum_first", num_timesteps=2)
    if policy != "on":
        x["old_log_prob"] = _off_policy_old(x, gen, 0.6, **options)
    ref = _compare(x, **options)
    if policy != "on":  # both the clipped and the unclipped branch are exercised
        assert 0 < ref.clipfrac.item() < 1


@pytest.mark.parametrize("rows,shape", [(1, (7,)), (5, (3, 17)), (6, (2, 5, 13)), (4, (97,))],
                         ids=["one_row", "odd", "non_pow2_3d", "prime_long_row"])
@pytest.mark.parametrize("dtypes", [(F32,) * 4, (F16,) * 4, (BF16,) * 4, (BF16, F32, F16, F32)],
                         ids=["fp32", "fp16", "bf16", "mixed"])
def test_shapes_and_dtypes_match_reference(gen, device, rows, shape, dtypes):
    x = _inputs(gen, device, rows, shape, dtypes)
    options = dict(beta=0.05, ema_beta=1.0, clip_range=0.3)
    x["old_log_prob"] = _off_policy_old(x, gen, 0.6, **options).double()  # an fp64 per-row input as well
    _compare(x, **options)


def test_without_kl_terms_and_with_grad_output_scaling(gen, device):
    x = _inputs(gen, device, rows=5, shape=(23,))
    x.pop("v_ref")
    x.pop("v_ema")
    ref = _compare(x, grad_scale=2.5, weighting="t2")
    assert (ref.kl == 0).all() and (ref.kl_ema == 0).all()


def test_non_contiguous_inputs(gen, device):
    big = _inputs(gen, device, rows=9, shape=(4, 22))
    x = dict(
        v=big["v"][:5, :, ::2],  # inner stride 2: copied once
        target=big["target"][2:7, :, :11],  # a row-strided view with unit inner stride: used in place
        t=big["t"][::2][:5], advantages=big["advantages"][::2].flip(0),
        v_ref=big["v_ref"][:5].transpose(1, 2).contiguous().transpose(1, 2)[:, :, 3:14],
        v_ema=big["v_ema"][4:9, :, 5:16],
    )
    _compare(x, beta=0.2, ema_beta=0.4)


def test_gradients_of_target_and_anchors(gen, device):
    x = _inputs(gen, device, rows=4, shape=(19,))
    grads = {}
    for backend in ("torch", "triton"):
        leaves = {k: (x[k].double() if backend == "torch" else x[k]).detach().requires_grad_()
                  for k in ("v", "target", "v_ref", "v_ema")}
        out = awm_loss(**{**x, **leaves}, beta=0.3, ema_beta=0.6, weighting="huber", backend=backend)
        out.loss.backward()
        grads[backend] = {k: leaf.grad for k, leaf in leaves.items()}
    for k in grads["torch"]:
        torch.testing.assert_close(grads["triton"][k].double(), grads["torch"][k], **tol(F32))


def test_stats_are_detached_and_loss_needs_grad(gen, device):
    x = _inputs(gen, device, rows=3, shape=(8,))
    v = x.pop("v").requires_grad_()
    out = awm_loss(v, **x, backend="triton")
    assert out.loss.requires_grad
    assert not any(getattr(out, name).requires_grad for name in STATS)
