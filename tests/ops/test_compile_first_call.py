"""The drop-in ops compose with torch.compile from the first call: in a fresh process, `torch.compile(...,
fullgraph=True)` over `awm_loss` and `sde_step` with their default arguments (backend="auto") traces before any
eager call, with the native extension loaded and without it (AWM_FAST_NO_EXT=1), and gives the eager values.
Backend availability is decided at import (awm_fast.ops.dispatch), never inside the trace."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from awm_fast.ops import native_backend

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
import torch
from awm_fast.ops import awm_loss, sde_step

compiler, expect_native = sys.argv[1], sys.argv[2] == "1"
graphs = []

def recording(gm, example_inputs):  # dynamo's graph, then the named compiler
    graphs.append(gm.code)
    return compiler_fn(gm, example_inputs)

if compiler == "inductor":
    from torch._inductor.compile_fx import compile_fx as compiler_fn
else:
    from torch._dynamo.backends.registry import lookup_backend
    compiler_fn = lookup_backend(compiler)

gen = torch.Generator().manual_seed(0)
mk = lambda *s: torch.randn(*s, generator=gen)
v, target, v_ref, v_ema = mk(6, 2, 5), mk(6, 2, 5), mk(6, 2, 5), mk(6, 2, 5)
t, adv = torch.rand(6, generator=gen) * 0.9 + 0.05, mk(6)

def loss_fn(v, target, t, adv, v_ref, v_ema):
    return awm_loss(v, target, t, adv, v_ref=v_ref, v_ema=v_ema, beta=0.1, ema_beta=0.2).loss

def step_fn(x, v, sigma, sigma_next, noise):
    return sde_step(x, v, sigma, sigma_next, noise=noise).x_next

def log_prob_fn(x, v, sigma, sigma_next, x_next):
    return sde_step(x, v, sigma, sigma_next, x_next=x_next).log_prob

# compiled first: nothing of awm_fast.ops has run eagerly in this process
leaf = v.clone().requires_grad_()
loss = torch.compile(loss_fn, fullgraph=True, backend=recording)(leaf, target, t, adv, v_ref, v_ema)
loss.backward()
sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.4, 0.3, 0.2]), torch.full((6,), 0.1)
x, noise = mk(6, 2, 5), mk(6, 2, 5)
with torch.no_grad():
    x_next = torch.compile(step_fn, fullgraph=True, backend=recording)(x, v, sigma, sigma_next, noise)
vl = v.clone().requires_grad_()
lp = torch.compile(log_prob_fn, fullgraph=True, backend=recording)(x, vl, sigma, sigma_next, x_next)
lp.sum().backward()

# the eager values
leaf_e = v.clone().requires_grad_()
loss_e = loss_fn(leaf_e, target, t, adv, v_ref, v_ema)
loss_e.backward()
with torch.no_grad():
    x_next_e = step_fn(x, v, sigma, sigma_next, noise)
vl_e = v.clone().requires_grad_()
lp_e = log_prob_fn(x, vl_e, sigma, sigma_next, x_next_e)
lp_e.sum().backward()
for got, want in ((loss, loss_e), (leaf.grad, leaf_e.grad), (x_next, x_next_e), (lp, lp_e), (vl.grad, vl_e.grad)):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
native = [g for g in graphs if "_native" in g]
assert len(graphs) == 3, len(graphs)
assert (len(native) == 3) if expect_native else not native, (expect_native, graphs)
print("ok", compiler, "native" if expect_native else "torch")
"""


def _run(compiler: str, no_ext: bool) -> None:
    env = {**os.environ, "AWM_FAST_NO_EXT": "1" if no_ext else "0"}
    env.pop("AWM_FAST_BACKEND", None)
    expect_native = not no_ext and native_backend.available("cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, compiler, "1" if expect_native else "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("native" if expect_native else "torch"), proc.stdout


@pytest.mark.parametrize("no_ext", [False, True], ids=["with_extension", "without_extension"])
def test_compile_before_any_eager_call(no_ext):
    _run("aot_eager", no_ext)


def test_compile_before_any_eager_call_inductor():
    _run("inductor", no_ext=not native_backend.available("cpu"))
