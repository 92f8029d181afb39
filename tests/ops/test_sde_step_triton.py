"""The Triton rollout step against the float64 torch reference; in-kernel noise; in-place; bad input.

Runs in the Triton interpreter on CPU (see conftest.py) and on the GPU when there is one, with NaN-poisoned
launcher buffers and tiny tiles.
"""
import pytest
import torch
from scipy import stats

from awm_fast.ops import sde_step
from tests.tolerances import tol

pytestmark = pytest.mark.usefixtures("poison_and_tiny_tiles")
KINDS = ("euler_maruyama", "cps", "ode")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# per-row sigmas: the sigma == 1 first step, middle steps, and the last (deterministic) step
SIGMA, SIGMA_NEXT = [1.0, 0.55, 0.3, 0.7], [0.9, 0.4, 0.0, 0.65]


def _tensors(gen, device, dtype, b=3, shape=(2, 3, 7), n=4):
    return [torch.randn(b, *shape, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(n)]


def _sigmas(device, b=3):
    return torch.tensor(SIGMA[:b], device=device), torch.tensor(SIGMA_NEXT[:b], device=device)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_sampling_matches_reference(gen, device, kind, cfg, dtype):
    x, v, vu, noise = _tensors(gen, device, dtype)
    s, sn = _sigmas(device)
    kw = dict(noise=noise, noise_level=0.7, kind=kind, v_uncond=vu if cfg else None, guidance_scale=4.5)
    ref = sde_step(x.double(), v.double(), s, sn, backend="torch", **{**kw, "noise": noise.double(),
                                                                        "v_uncond": vu.double() if cfg else None})
    out = sde_step(x, v, s, sn, backend="triton", **kw)
    assert out.x_next.dtype == dtype and out.mean.dtype == dtype and out.log_prob.dtype == F32
    _close(out.x_next, ref.x_next, dtype)
    _close(out.mean, ref.mean, dtype)
    _close(out.log_prob, ref.log_prob, F32)
    assert out.log_prob[2] == 0  # the last step


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_log_prob_mode_values_and_gradients(gen, device, kind, cfg, dtype):
    x, v, vu, noise = _tensors(gen, device, dtype, b=2, shape=(29,))
    s, sn = torch.tensor([0.8, 0.5], device=device), torch.tensor([0.7, 0.35], device=device)
    x_next = sde_step(x, v, s, sn, noise=noise, kind="euler_maruyama", backend="torch").x_next
    w_lp, w_mean = _tensors(gen, device, F32, b=2, shape=(29,), n=2)
    w_lp = w_lp[:, 0]
    results = {}
    for backend in ("torch", "triton"):
        cast = (lambda a: a.double()) if backend == "torch" else (lambda a: a)  # noqa: E731
        leaves = {k: cast(a).detach().requires_grad_() for k, a in (("x", x), ("v", v), ("x_next", x_next),
                                                                   ("v_uncond", vu))}
        out = sde_step(leaves["x"], leaves["v"], s, sn, x_next=leaves["x_next"], noise_level=0.8, kind=kind,
                       v_uncond=leaves["v_uncond"] if cfg else None, guidance_scale=3.0, backend=backend)
        ((out.log_prob * w_lp).sum() + (out.mean * w_mean).sum()).backward()
        results[backend] = (out, {k: leaf.grad for k, leaf in leaves.items()})
    (ref, ref_grads), (out, grads) = results["torch"], results["triton"]
    _close(out.log_prob, ref.log_prob, F32)
    _close(out.mean, ref.mean, dtype)
    for name in ("x", "v", "x_next") + (("v_uncond",) if cfg else ()):
        assert grads[name].dtype == dtype
        expected = ref_grads[name] if ref_grads[name] is not None else torch.zeros_like(grads[name])  # ode
        _close(grads[name], expected, dtype)


@pytest.mark.parametrize("shape", [(1, 5), (4, 3, 11), (3, 131)], ids=["one_row_tiny", "odd_3d", "prime_long"])
def test_shapes_and_in_place(gen, device, shape):
    x, v, _, noise = _tensors(gen, device, F32, b=shape[0], shape=shape[1:])
    s, sn = _sigmas(device, shape[0])
    ref = sde_step(x, v, s, sn, noise=noise, backend="torch")
    x_in = x.clone()
    out = sde_step(x_in, v, s, sn, noise=noise, backend="triton", out=x_in)
    assert out.x_next is x_in
    _close(x_in, ref.x_next, F32)
    _close(out.log_prob, ref.log_prob, F32)


def test_non_contiguous_inputs_and_out(gen, device):
    big = _tensors(gen, device, F32, b=3, shape=(4, 18))
    x, v, noise = big[0][:, :, ::2], big[1][:, :, :9], big[3][:, :, 9:]
    vu = big[2].transpose(1, 2)[:, :9, :].transpose(1, 2)
    s, sn = _sigmas(device)
    ref = sde_step(x, v, s, sn, noise=noise, v_uncond=vu, guidance_scale=2.0, kind="cps", backend="torch")
    out_buf = torch.empty(3, 9, 4, device=device).transpose(1, 2)  # not contiguous
    out = sde_step(x, v, s, sn, noise=noise, v_uncond=vu, guidance_scale=2.0, kind="cps", backend="triton",
                   out=out_buf)
    assert out.x_next is out_buf
    _close(out_buf, ref.x_next, F32)
    _close(out.mean, ref.mean, F32)


def test_generator_noise_matches_torch_backend(gen, device):
    x, v = _tensors(gen, device, F32, n=2)
    s, sn = _sigmas(device)
    outs = [sde_step(x, v, s, sn, generator=torch.Generator(device).manual_seed(7), backend=b) for b in
            ("torch", "triton")]
    _close(outs[1].x_next, outs[0].x_next, F32)


def test_in_kernel_noise_is_reproducible_and_standard_normal(device, monkeypatch):
    from awm_fast.kernels import awm_loss as common

    monkeypatch.setattr(common, "MAX_BLOCK", 1024)  # whole rows per tile: the interpreter draws faster
    b, d = 4, 2500
    x = torch.zeros(b, d, device=device)
    v = torch.ones(b, d, device=device)
    s, sn = 0.6, 0.5

    def draw(seed, offset=0, rows=b):
        out = sde_step(x[:rows], v[:rows], s, sn, seed=seed, offset=offset, kind="cps", noise_level=1.0,
                       backend="triton")
        return (out.x_next - out.mean) / (sn * 1.0)  # cps with a = 1: scale = sigma_next, so this is xi

    xi = draw(seed=123)
    torch.testing.assert_close(draw(seed=123), xi, rtol=0, atol=0)
    assert not torch.equal(draw(seed=124), xi)
    # the contract: element i of the flattened batch is randn(seed, offset + i)
    torch.testing.assert_close(draw(seed=123, offset=2 * d, rows=2), xi[2:], rtol=0, atol=0)
    flat = xi.flatten().double().cpu()
    assert abs(flat.mean().item()) < 4 / flat.numel() ** 0.5
    assert abs(flat.var().item() - 1) < 0.05
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3


def test_bad_input(device):
    x = torch.randn(2, 6, device=device)
    with pytest.raises(ValueError, match="seed"):
        sde_step(x, x, 0.5, 0.4, seed=1, backend="torch")
    with pytest.raises(ValueError, match="seed"):
        sde_step(x, x, 0.5, 0.4, seed=1, noise=x, backend="triton")
    with pytest.raises(ValueError, match="offset"):
        sde_step(x, x, 0.5, 0.4, seed=1, offset=-1, backend="triton")
    with pytest.raises(ValueError, match="out must match"):
        sde_step(x, x, 0.5, 0.4, out=x.double(), backend="triton")
    with pytest.raises(ValueError, match="not differentiable"):
        sde_step(x, x.clone().requires_grad_(), 0.5, 0.4, backend="triton")
    with pytest.raises(ValueError, match="all tensors must share one device"):
        sde_step(x, torch.randn(2, 6, device="meta"), 0.5, 0.4, backend="triton")
