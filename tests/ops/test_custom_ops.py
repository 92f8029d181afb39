"""Registration of the ops as torch custom ops: opcheck, torch.compile(fullgraph) without recompiles, the
closed-form gradient of the torch reference op against autograd, and a torch-only import.

On CPU, torch.compile runs the torch-backend path and the test reference op `awm_fast_tests::awm_loss_ref`
(tests/ops/reference_op.py; the Triton interpreter cannot run under FakeTensor tracing); with CUDA the Triton ops
are compiled and opchecked as well.
"""
import subprocess
import sys

import pytest
import torch

from awm_fast.ops import awm_loss, sde_step
from awm_fast.ops.awm_loss_torch import KL_WEIGHTINGS, WEIGHTINGS, awm_loss_torch
from tests.ops import reference_op  # noqa: F401  registers awm_fast_tests::awm_loss_ref
from tests.tolerances import tol

HAS_CUDA = torch.cuda.is_available()
F64 = torch.float64


def _args(gen, rows=4, d=9, ref=True, ema=True, old=False, device="cpu", dtype=F64, **options):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(device, dtype)  # noqa: E731
    opts = dict(beta=0.3, ema_beta=0.6, weighting="ghuber", ghuber_power=0.25, clip_range=0.2,
                kl_weighting="uniform", ratio_mode="exp_first", num_timesteps=1)
    opts.update(options)
    t = (torch.rand(rows, generator=gen, dtype=F64) * 0.9 + 0.05).to(device)
    adv = (torch.rand(rows, generator=gen, dtype=F64) * 2 - 1).to(device)
    old_lp = (-torch.rand(rows, generator=gen, dtype=F64) * 3).to(device) if old else None
    return (mk(rows, d), mk(rows, d), t, adv, mk(rows, d) if ref else None, mk(rows, d) if ema else None, old_lp,
            *opts.values())


@pytest.mark.parametrize("ref,ema,old", [(True, True, False), (False, False, True), (True, False, True)])
def test_opcheck_torch_reference_op(gen, ref, ema, old):
    args = list(_args(gen, ref=ref, ema=ema, old=old, dtype=torch.float32))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(torch.ops.awm_fast_tests.awm_loss_ref, tuple(args))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kl_weighting", KL_WEIGHTINGS)
@pytest.mark.parametrize("ratio_mode", ["exp_first", "sum_first"])
def test_reference_op_closed_form_gradient_equals_autograd(gen, weighting, kl_weighting, ratio_mode):
    args = list(_args(gen, rows=6, old=True, weighting=weighting, kl_weighting=kl_weighting,
                      ratio_mode=ratio_mode, num_timesteps=3 if ratio_mode == "sum_first" else 1))
    grads = []
    for op in (awm_loss_torch, torch.ops.awm_fast_tests.awm_loss_ref):
        leaves = [args[i].detach().requires_grad_() for i in (0, 1, 4, 5)]
        call = list(args)
        call[0], call[1], call[4], call[5] = leaves
        loss = op(*call)[0]
        (loss * 1.5).backward()  # a grad_output exactly representable in the op's fp32 loss
        grads.append([leaf.grad for leaf in leaves])
    for auto, closed in zip(*grads):
        torch.testing.assert_close(closed, auto, **tol(F64))


def _compile_and_check(fn, calls):
    """fullgraph compile; the changing calls must neither break the graph nor recompile, and values and the
    gradient w.r.t. the first argument (when it requires grad) must equal eager's."""
    torch._dynamo.reset()
    backend = "inductor" if HAS_CUDA else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for args in calls:
            results = []
            for f in (fn, compiled):
                first = args[0].detach().requires_grad_(args[0].requires_grad)
                outs = f(first, *args[1:])
                if first.requires_grad:
                    outs[0].backward()
                    outs = (*outs, first.grad)
                results.append(outs)
            for want, got in zip(*results):
                torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_CUDA else []))
def test_awm_loss_compiles_fullgraph_without_recompiles(gen, backend):
    device = "cuda" if backend == "triton" else "cpu"
    v, target, t, adv, v_ref, v_ema = _args(gen, rows=6, d=33, device=device, dtype=torch.float32)[:6]

    def step(v, t, adv):
        out = awm_loss(v, target, t, adv, v_ref=v_ref, v_ema=v_ema, beta=0.1, ema_beta=0.5, backend=backend)
        return out.loss, out.log_prob, out.kl

    calls = [(v.requires_grad_(), t * s, adv * (1 - s)) for s in (0.3, 0.6, 0.9)]
    _compile_and_check(step, calls)


def test_reference_op_compiles_fullgraph_without_recompiles(gen):
    base = _args(gen, rows=4, d=17, dtype=torch.float32)

    def step(v, t, adv):
        out = torch.ops.awm_fast_tests.awm_loss_ref(v, base[1], t, adv, *base[4:])
        return out[0], out[1], out[3]

    _compile_and_check(step, [(base[0].requires_grad_(), base[2] * s, base[3] * (1 - s)) for s in (0.3, 0.6, 0.9)])


def test_torch_sampling_step_compiles_once_for_every_batch_size(gen):
    """The torch path's sampling step (noise from the default generator) under torch.compile with dynamic shapes:
    one graph serves every row count, and it draws the noise eager draws (randn with generator=None used to fail
    to trace once the batch size was symbolic)."""
    torch._dynamo.reset()

    def sample(x, v, s, sn):
        return sde_step(x, v, s, sn, noise_level=0.7, backend="torch").x_next

    compiled = torch.compile(sample, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (3, 7, 12):
            x, v = torch.randn(rows, 2, 5, generator=gen), torch.randn(rows, 2, 5, generator=gen)
            s = torch.rand(rows, generator=gen) * 0.5 + 0.4
            results = []
            for f in (sample, compiled):
                torch.manual_seed(rows)
                results.append(f(x, v, s, s - 0.1))
            torch.testing.assert_close(results[1], results[0], **tol(torch.float32))


@pytest.mark.skipif(not HAS_CUDA, reason="Triton ops under torch.compile / opcheck need CUDA")
def test_triton_ops_opcheck_and_sde_compile(gen):
    args = list(_args(gen, device="cuda", dtype=torch.float32, old=True))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(torch.ops.awm_fast.awm_loss_triton, tuple(args))
    x, v = torch.randn(2, 3, 40, device="cuda"), torch.randn(2, 3, 40, device="cuda")
    s, sn = torch.tensor([0.8, 0.5], device="cuda"), torch.tensor([0.7, 0.4], device="cuda")
    x_next = x + 0.1 * v
    torch.library.opcheck(torch.ops.awm_fast.sde_log_prob_triton,
                          (x, v.clone().requires_grad_(), s, sn, None, x_next, 0.7, "euler_maruyama", 1.0))

    def roll(x, v, s, sn, offset):
        out = sde_step(x, v, s, sn, seed=5, offset=offset, backend="triton")
        return out.x_next, out.log_prob

    _compile_and_check(roll, [(x, v, s * k, sn * k, 0) for k in (1.0, 0.9)])


def test_ops_import_with_torch_only():
    code = "import sys, awm_fast.ops; assert 'triton' not in sys.modules and 'awm_fast.kernels' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
