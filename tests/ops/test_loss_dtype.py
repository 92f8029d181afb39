"""The loss comes back in the inputs' precision on every backend: float64 for float64 inputs (the native ops
compute it in float64 on CPU, so it equals the float64 reference at float64 tolerance), float32 from the fused
backends for float32 / half inputs (the torch reference stays float64 for every input dtype), and the fake
(meta) implementations agree with the real ones."""
import importlib.util
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from awm_fast.ops import awm_loss, native_backend
from awm_fast.ops.torch_ops import loss_dtype
from tests.tolerances import tol

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
FUSED = (["cpp"] if native_backend.available("cpu") else []) + (
    ["triton"] if importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1" else [])


def _inputs(gen, dtype, rows=4, shape=(3, 5)):
    mk = lambda: torch.randn(rows, *shape, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    return dict(v=mk(), target=mk(), t=torch.rand(rows, generator=gen) * 0.9 + 0.05, v_ref=mk(), v_ema=mk(),
                advantages=torch.randn(rows, generator=gen), old_log_prob=-torch.rand(rows, generator=gen))


def test_the_rule():
    assert [loss_dtype(torch.empty(1, dtype=d)) for d in (F64, F32, torch.float16, BF16)] == [F64, F32, F32, F32]


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_loss_dtype_per_backend(gen, backend, dtype):
    x = _inputs(gen, dtype)
    v = x.pop("v").requires_grad_()
    out = awm_loss(v, **x, beta=0.2, ema_beta=0.3, backend=backend)
    assert out.loss.dtype == (F64 if backend == "torch" else loss_dtype(v)) and out.loss.dim() == 0
    out.loss.backward()
    assert v.grad.dtype == dtype
    if dtype == F64:
        ref = awm_loss(v.detach(), **x, beta=0.2, ema_beta=0.3, backend="torch").loss
        # cpp: float64 math end to end; triton: float32 accumulation, returned as float64
        torch.testing.assert_close(out.loss, ref, **tol(F64 if backend == "cpp" else F32))


@pytest.mark.skipif(not native_backend.available("cpu"), reason="native extension not built")
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["fp64", "fp32", "bf16"])
def test_native_fake_output_dtypes_match_the_kernel(gen, dtype):
    x = _inputs(gen, dtype)
    args = (x["v"], x["target"], x["t"], x["advantages"], x["v_ref"], x["v_ema"], x["old_log_prob"], 0.2, 0.3,
            "ghuber", 0.25, 1.0, "uniform", "exp_first", 1)
    real = torch.ops.awm_fast.awm_loss_native(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.awm_fast.awm_loss_native(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                    for a in args))
    assert [r.dtype for r in real] == [f.dtype for f in fake]
    assert real[0].dtype == loss_dtype(x["v"])
