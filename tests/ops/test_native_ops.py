"""The native ops (csrc/, backend "cpp" on CPU and "cuda" on a GPU) against the float64 torch reference:
values and gradients for every option, dtypes (float64 included, at float64 tolerance), awkward and
non-contiguous shapes; in-kernel Philox noise equal to Triton's; opcheck; torch.compile(fullgraph).

Skipped when the extension is not built (see test_native_fallback.py for that case).
"""
import pytest
import torch

from awm_fast.ops import awm_loss, native_backend, sde_step
from awm_fast.ops.awm_loss_torch import KL_WEIGHTINGS, WEIGHTINGS
from tests.tolerances import tol

if not native_backend.available("cpu"):
    pytest.skip(f"native extension not built: {native_backend.why_unavailable()}", allow_module_level=True)

BACKENDS = ["cpp"] + (["cuda"] if native_backend.available("cuda") and torch.cuda.is_available() else [])
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
STATS = ("log_prob", "mse", "kl", "kl_ema", "clipfrac")
SIGMA, SIGMA_NEXT = [1.0, 0.55, 0.3, 0.7], [0.9, 0.4, 0.0, 0.65]  # first step, middle, last (deterministic)


def _dev(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _loss_inputs(gen, device, rows, shape, dtypes=(F32,) * 4):
    mk = lambda dtype: torch.randn(rows, *shape, generator=gen, dtype=F64).to(device, dtype)  # noqa: E731
    v, target, v_ref, v_ema = (mk(d) for d in dtypes)
    t = (torch.rand(rows, generator=gen, dtype=F64) * 0.9 + 0.05).to(device, F32)
    adv = (torch.rand(rows, generator=gen, dtype=F64) * 2 - 1).to(device, F32)
    return dict(v=v, target=target, t=t, advantages=adv, v_ref=v_ref, v_ema=v_ema)


def _old(x, gen, spread, **options):
    """old_log_prob shifted per sample by +-spread (even samples: clipped) or +-spread / 10 (odd: not)."""
    lp = awm_loss(**x, backend="torch", **options).log_prob
    samples = lp.shape[0] // options.get("num_timesteps", 1)
    sample = torch.arange(lp.shape[0]) % samples
    sign = torch.randint(0, 2, (lp.shape[0],), generator=gen) * 2 - 1
    shift = torch.where(sample % 2 == 0, spread, spread / 10) * sign
    return lp + shift.to(lp.device, lp.dtype)


def _compare_loss(x, backend, grad_scale=1.0, **options):
    results = {}
    for b in ("torch", backend):
        leaves = {k: (x[k].double() if b == "torch" else x[k]).detach().requires_grad_()
                  for k in ("v", "target", "v_ref", "v_ema") if x.get(k) is not None}
        out = awm_loss(**{**x, **leaves}, backend=b, **options)
        (out.loss * grad_scale).backward()
        results[b] = (out, {k: leaf.grad for k, leaf in leaves.items()})
    (ref, ref_grads), (out, grads) = results["torch"], results[backend]
    # float64 math on CPU when every latent input is float64; float32 math otherwise (and on CUDA)
    f64_math = backend == "cpp" and all(x[k].dtype == F64 for k in grads)
    # the loss in the inputs' precision: float64 for float64 v (as the torch backend), float32 otherwise
    assert out.loss.dtype == (F64 if x["v"].dtype == F64 else F32) and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.double(), ref.loss, **tol(F64 if f64_math else F32))
    for name in STATS:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol(F32))
    for k, g in grads.items():
        assert g.dtype == x[k].dtype and g.shape == x[k].shape
        check = x[k].dtype if (x[k].dtype != F64 or f64_math) else F32
        torch.testing.assert_close(g.double(), ref_grads[k], **tol(check))
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kl_weighting", KL_WEIGHTINGS)
@pytest.mark.parametrize("policy", ["on", "off_exp_first", "off_sum_first"])
def test_loss_every_option_matches_reference(gen, backend, weighting, kl_weighting, policy):
    x = _loss_inputs(gen, _dev(backend), rows=8, shape=(3, 13))
    options = dict(beta=0.3, ema_beta=0.7, weighting=weighting, kl_weighting=kl_weighting, clip_range=0.2)
    if policy == "off_sum_first":
        options.update(ratio_mode="sum_first", num_timesteps=2)
    if policy != "on":
        x["old_log_prob"] = _old(x, gen, 0.6, **options)
    ref = _compare_loss(x, backend, **options)
    if policy != "on":
        assert 0 < ref.clipfrac.item() < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,shape", [(1, (7,)), (5, (3, 17)), (6, (2, 5, 13)), (3, (40000,))],
                         ids=["one_row", "odd", "non_pow2_3d", "rows_of_two_chunks"])
@pytest.mark.parametrize("dtypes", [(F64,) * 4, (F32,) * 4, (F16,) * 4, (BF16,) * 4, (BF16, F32, F16, F64)],
                         ids=["fp64", "fp32", "fp16", "bf16", "mixed"])
def test_loss_shapes_and_dtypes(gen, backend, rows, shape, dtypes):
    x = _loss_inputs(gen, _dev(backend), rows, shape, dtypes)
    options = dict(beta=0.05, ema_beta=1.0, clip_range=0.3)
    x["old_log_prob"] = _old(x, gen, 0.6, **options).double()
    _compare_loss(x, backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_kl_and_grad_scaling_and_non_contiguous(gen, backend):
    x = _loss_inputs(gen, _dev(backend), rows=5, shape=(23,))
    x.pop("v_ref")
    x.pop("v_ema")
    ref = _compare_loss(x, backend, grad_scale=2.5, weighting="t2")
    assert (ref.kl == 0).all() and (ref.kl_ema == 0).all()
    big = _loss_inputs(gen, _dev(backend), rows=9, shape=(4, 22))
    x = dict(v=big["v"][:5, :, ::2], target=big["target"][2:7, :, :11], t=big["t"][::2][:5],
             advantages=big["advantages"][::2].flip(0), v_ref=big["v_ref"][:5].transpose(1, 2)[:, 3:14, :],
             v_ema=big["v_ema"][4:9, :, 5:16])
    x["v_ref"] = x["v_ref"].transpose(1, 2)
    _compare_loss(x, backend, beta=0.2, ema_beta=0.4, weighting="huber")


def _tensors(gen, device, dtype, b=3, shape=(2, 3, 7), n=4):
    return [torch.randn(b, *shape, generator=gen, dtype=F64).to(device, dtype) for _ in range(n)]


def _sigmas(device, b=3):
    return torch.tensor(SIGMA[:b], device=device), torch.tensor(SIGMA_NEXT[:b], device=device)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["euler_maruyama", "cps", "ode"])
@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16])
def test_sde_sampling_matches_reference(gen, backend, kind, cfg, dtype):
    x, v, vu, noise = _tensors(gen, _dev(backend), dtype)
    s, sn = _sigmas(_dev(backend))
    kw = dict(noise=noise, noise_level=0.7, kind=kind, v_uncond=vu if cfg else None, guidance_scale=4.5)
    ref = sde_step(x.double(), v.double(), s, sn, backend="torch",
                   **{**kw, "noise": noise.double(), "v_uncond": vu.double() if cfg else None})
    out = sde_step(x, v, s, sn, backend=backend, **kw)
    assert out.x_next.dtype == dtype and out.mean.dtype == dtype and out.log_prob.dtype == F32
    check = dtype if (dtype != F64 or backend == "cpp") else F32
    _close(out.x_next, ref.x_next, check)
    _close(out.mean, ref.mean, check)
    _close(out.log_prob, ref.log_prob, F32)
    assert out.log_prob[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["euler_maruyama", "cps", "ode"])
@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_sde_log_prob_values_and_gradients(gen, backend, kind, cfg, dtype):
    device = _dev(backend)
    x, v, vu, noise = _tensors(gen, device, dtype, b=2, shape=(29,))
    s, sn = torch.tensor([0.8, 0.5], device=device), torch.tensor([0.7, 0.35], device=device)
    x_next = sde_step(x, v, s, sn, noise=noise, backend="torch").x_next
    w_lp, w_mean = _tensors(gen, device, F32, b=2, shape=(29,), n=2)
    results = {}
    for b in ("torch", backend):
        cast = (lambda a: a.double()) if b == "torch" else (lambda a: a)  # noqa: E731
        leaves = {k: cast(a).detach().requires_grad_() for k, a in (("x", x), ("v", v), ("x_next", x_next),
                                                                   ("v_uncond", vu))}
        out = sde_step(leaves["x"], leaves["v"], s, sn, x_next=leaves["x_next"], noise_level=0.8, kind=kind,
                       v_uncond=leaves["v_uncond"] if cfg else None, guidance_scale=3.0, backend=b)
        ((out.log_prob * w_lp[:, 0]).sum() + (out.mean * w_mean).sum()).backward()
        results[b] = (out, {k: leaf.grad for k, leaf in leaves.items()})
    (ref, ref_grads), (out, grads) = results["torch"], results[backend]
    check = dtype if (dtype != F64 or backend == "cpp") else F32
    _close(out.log_prob, ref.log_prob, F32)
    _close(out.mean, ref.mean, check)
    for name in ("x", "v", "x_next") + (("v_uncond",) if cfg else ()):
        assert grads[name].dtype == dtype
        expected = ref_grads[name] if ref_grads[name] is not None else torch.zeros_like(grads[name])
        _close(grads[name], expected, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_shapes_in_place_non_contiguous_and_generator(gen, backend):
    device = _dev(backend)
    for shape in [(1, 5), (4, 3, 11), (2, 70001)]:
        x, v, _, noise = _tensors(gen, device, F32, b=shape[0], shape=shape[1:])
        s, sn = _sigmas(device, shape[0])
        ref = sde_step(x, v, s, sn, noise=noise, backend="torch")
        x_in = x.clone()
        out = sde_step(x_in, v, s, sn, noise=noise, backend=backend, out=x_in)
        assert out.x_next is x_in
        _close(x_in, ref.x_next, F32)
        _close(out.log_prob, ref.log_prob, F32)
    big = _tensors(gen, device, F32, b=3, shape=(4, 18))
    x, v, noise = big[0][:, :, ::2], big[1][:, :, :9], big[3][:, :, 9:]
    vu = big[2].transpose(1, 2)[:, :9, :].transpose(1, 2)
    s, sn = _sigmas(device)
    kw = dict(noise=noise, v_uncond=vu, guidance_scale=2.0, kind="cps")
    ref = sde_step(x, v, s, sn, backend="torch", **kw)
    out_buf = torch.empty(3, 9, 4, device=device).transpose(1, 2)
    out = sde_step(x, v, s, sn, backend=backend, out=out_buf, **kw)
    assert out.x_next is out_buf
    _close(out_buf, ref.x_next, F32)
    _close(out.mean, ref.mean, F32)
    x, v = _tensors(gen, device, F32, n=2)
    outs = [sde_step(x, v, s, sn, generator=torch.Generator(device).manual_seed(7), backend=b)
            for b in ("torch", backend)]
    _close(outs[1].x_next, outs[0].x_next, F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_contract_and_equal_to_triton(backend):
    from scipy import stats

    device = _dev(backend)
    b, d = 4, 2500
    x, v = torch.zeros(b, d, device=device), torch.ones(b, d, device=device)

    def draw(seed, offset=0, rows=b, which=backend):
        out = sde_step(x[:rows], v[:rows], 0.6, 0.5, seed=seed, offset=offset, kind="cps", noise_level=1.0,
                       backend=which)
        return (out.x_next - out.mean) / 0.5  # cps with a = 1: scale = sigma_next, so this is xi

    xi = draw(123)
    torch.testing.assert_close(draw(123), xi, rtol=0, atol=0)
    assert not torch.equal(draw(124), xi)
    torch.testing.assert_close(draw(123, offset=2 * d, rows=2), xi[2:], rtol=0, atol=0)
    flat = xi.flatten().double().cpu()
    assert abs(flat.mean().item()) < 4 / flat.numel() ** 0.5 and abs(flat.var().item() - 1) < 0.05
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # the same stream as Triton's tl.randn(seed, offset + i) (the interpreter on CPU), up to float rounding
    pytest.importorskip("triton")
    triton_xi = draw(2**40 + 77, offset=2**31, rows=1, which="triton").flatten()[:512]
    torch.testing.assert_close(draw(2**40 + 77, offset=2**31, rows=1).flatten()[:512], triton_xi,
                               atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x = torch.randn(2, 6, device=_dev(backend))
    with pytest.raises(ValueError, match="not differentiable"):
        sde_step(x, x.clone().requires_grad_(), 0.5, 0.4, backend=backend)
    with pytest.raises(ValueError, match="offset"):
        sde_step(x, x, 0.5, 0.4, seed=1, offset=2**32, backend=backend)
    with pytest.raises(ValueError, match="weighting="):
        torch.ops.awm_fast.awm_loss_native(x, x, x[:, 0], x[:, 0], None, None, None, 0.0, 0.0, "bogus", 0.25, 1.0,
                                           "uniform", "exp_first", 1)
    with pytest.raises(TypeError, match="floating tensor"):
        torch.ops.awm_fast.awm_loss_native(x.int(), x, x[:, 0], x[:, 0], None, None, None, 0.0, 0.0, "t", 0.25,
                                           1.0, "uniform", "exp_first", 1)
    with pytest.raises(ValueError, match="runs on"):
        sde_step(x, x, 0.5, 0.4, backend="cuda" if backend == "cpp" else "cpp")


def test_auto_prefers_cpp_on_cpu_and_sampling_with_grad_falls_back(monkeypatch):
    from awm_fast.ops.dispatch import resolve_backend

    monkeypatch.delenv("AWM_FAST_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"
    x = torch.randn(2, 6)
    v = x.clone().requires_grad_()
    out = sde_step(x, v, 0.5, 0.4, noise=torch.randn(2, 6))  # auto: the differentiable torch path
    out.x_next.sum().backward()
    assert v.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(gen, backend):
    device = _dev(backend)
    x = _loss_inputs(gen, device, rows=4, shape=(9,))
    old = torch.rand(4, device=device) - 1
    args = (x["v"].requires_grad_(), x["target"], x["t"], x["advantages"], x["v_ref"], x["v_ema"], old, 0.3, 0.6,
            "ghuber", 0.25, 0.2, "uniform", "exp_first", 1)
    torch.library.opcheck(torch.ops.awm_fast.awm_loss_native, args)
    xs, vs = torch.randn(2, 3, 40, device=device), torch.randn(2, 3, 40, device=device)
    s, sn = torch.tensor([0.8, 0.5], device=device), torch.tensor([0.7, 0.4], device=device)
    torch.library.opcheck(torch.ops.awm_fast.sde_log_prob_native,
                          (xs, vs.clone().requires_grad_(), s, sn, vs * 0.5, xs + 0.1 * vs, 0.7, "euler_maruyama", 2.0))
    torch.library.opcheck(torch.ops.awm_fast.sde_step_native,
                          (xs, vs, s, sn, None, None, torch.empty_like(xs), 0.7, "cps", 1.0, 3, 10))
    torch.library.opcheck(torch.ops.awm_fast.sde_log_prob_backward_native,
                          (xs, vs, s, sn, None, xs + 0.1 * vs, torch.ones(2, device=device), None, 0.7,
                           "euler_maruyama", 1.0, True, False))


def test_compiles_fullgraph_without_recompiles(gen):
    torch._dynamo.reset()
    x = _loss_inputs(gen, torch.device("cpu"), rows=6, shape=(33,))

    def step(v, t, adv):
        out = awm_loss(v, x["target"], t, adv, v_ref=x["v_ref"], v_ema=x["v_ema"], beta=0.1, ema_beta=0.5,
                       backend="cpp")
        roll = sde_step(v.detach(), x["target"], t, t * 0.9, seed=5, backend="cpp")
        return out.loss, out.log_prob, roll.x_next

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (0.3, 0.6, 0.9):
            args = (x["t"] * scale, x["advantages"] * (1 - scale))
            results = []
            for f in (step, compiled):
                v = x["v"].detach().requires_grad_()
                outs = f(v, *args)
                outs[0].backward()
                results.append((*outs, v.grad))
            for want, got in zip(*results):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
