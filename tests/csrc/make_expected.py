"""Writes tests/csrc/expected_values.h, the float64 expected values of tests/csrc/test_native_ops.cpp.

Run from the repo root: `.venv/bin/python tests/csrc/make_expected.py`.

The inputs are closed-form (sin/cos of the flat index), built the same way in the C++ test; the expected numbers
come from the float64 torch reference (`awm_fast.ops.*_torch`) and, for the noise, from Triton's tl.randn in the
interpreter (TRITON_INTERPRET=1). Rerun it when a formula changes.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

from awm_fast.ops.awm_loss_torch import awm_loss_torch  # noqa: E402
from awm_fast.ops.sde_step_torch import sde_step_torch  # noqa: E402

R, D = 4, 6
F64 = torch.float64


def field(a: float, b: float, fn) -> torch.Tensor:
    return torch.tensor([fn(a * k + b) for k in range(R * D)], dtype=F64).reshape(R, 2, 3)


def inputs():
    v, u = field(0.37, 0.1, math.sin), field(0.23, 0.0, math.cos)
    ref, ema = field(0.11, 1.0, math.sin), field(0.19, 0.5, math.cos)
    t = torch.tensor([0.1 + 0.2 * r for r in range(R)], dtype=F64)
    adv = torch.tensor([0.5 - 0.3 * r for r in range(R)], dtype=F64)
    old = torch.tensor([-0.05 * (r + 1) for r in range(R)], dtype=F64)
    return v, u, ref, ema, t, adv, old


LINES = ["// Written by tests/csrc/make_expected.py (float64 torch reference, Triton tl.randn): do not edit.",
         "#pragma once", "#include <vector>"]


def fmt(name, x):
    vals = ", ".join(f"{float(a):.17g}" for a in torch.as_tensor(x).detach().flatten())
    LINES.append(f"const std::vector<double> {name} = {{{vals}}};")


def main():
    v, u, ref, ema, t, adv, old = inputs()
    cases = {"ghuber": (None, "ghuber", "uniform", "exp_first", 1),
             "huber_sum_first": (old, "huber", "elbo", "sum_first", 2)}
    for name, (old_lp, weighting, klw, mode, steps) in cases.items():
        vv = v.clone().requires_grad_()
        out = awm_loss_torch(vv, u, t, adv, ref, ema, old_lp, 0.3, 0.7, weighting, 0.25, 0.2, klw, mode, steps)
        out[0].backward()
        fmt(f"k_{name}_loss", out[0].detach())
        fmt(f"k_{name}_log_prob", out[1].double())
        fmt(f"k_{name}_kl", out[3].double())
        fmt(f"k_{name}_grad", vv.grad)
    sigma = torch.tensor([1.0, 0.6, 0.3, 0.7], dtype=F64)
    sigma_next = torch.tensor([0.9, 0.45, 0.0, 0.65], dtype=F64)
    for kind in ("euler_maruyama", "cps"):
        x_next, lp, mean = sde_step_torch(u, v, sigma, sigma_next, ref, None, 0.7, kind, ema, 2.5, None)
        fmt(f"k_sde_{kind}_x_next", x_next)
        fmt(f"k_sde_{kind}_log_prob", lp.double())
    x = u.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    _, lp, mean = sde_step_torch(x, vv, sigma, sigma_next, None, None, 0.7, "euler_maruyama", None, 1.0, ref)
    (lp * torch.arange(1, R + 1, dtype=F64)).sum().backward()
    fmt("k_sde_lp_mode_log_prob", lp.double())
    fmt("k_sde_lp_mode_grad_v", vv.grad)
    fmt("k_sde_lp_mode_grad_x", x.grad)
    from awm_fast.ops import sde_step  # Triton interpreter: randn(123, i) for i < 8
    z = torch.zeros(1, 8)
    o = sde_step(z, z, 0.6, 0.5, seed=123, offset=5, kind="cps", noise_level=1.0, backend="triton")
    fmt("k_randn_seed123_offset5", (o.x_next - o.mean).double() / 0.5)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected_values.h")
    with open(path, "w") as f:
        f.write("\n".join(LINES) + "\n")
    print(path)


if __name__ == "__main__":
    main()
