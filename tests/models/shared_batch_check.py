"""The shared-batch check every model family's tests run: three separate calls and the shared batch give the same
velocities and the same "default" LoRA gradients."""
from __future__ import annotations

import torch

from awm_fast.models.lora import POLICY, adapter_params
from awm_fast.models.shared_batch import separate_velocities, shared_velocities
from tests.tolerances import tol


def both_ways(policy, x, t, cond, weight=None, need_ref=True, need_ema=True) -> list[tuple]:
    """[(v, v_ref, v_ema, grads) of the three calls, the same of the shared batch]: grads of (v * weight).sum()
    (v.square().sum() without a weight) per "default" LoRA weight, None where a weight gets no gradient."""
    params = list(adapter_params(policy.transformer, POLICY).values())
    results = []
    for fn in (separate_velocities, shared_velocities):
        for p in params:
            p.grad = None
        v, v_ref, v_ema = fn(policy, x, t, cond, need_ref, need_ema)
        (v.square() if weight is None else v * weight).sum().backward()
        results.append((v.detach(), v_ref, v_ema, [None if p.grad is None else p.grad.clone() for p in params]))
    return results


def assert_same_both_ways(results: list[tuple]) -> None:
    """Values (None where not needed) and gradients equal at float32 tolerance; a missing gradient on one side only
    fails."""
    (a, a_ref, a_ema, a_grads), (b, b_ref, b_ema, b_grads) = results
    for x1, x2 in ((a, b), (a_ref, b_ref), (a_ema, b_ema), *zip(a_grads, b_grads)):
        assert (x1 is None) == (x2 is None)
        if x1 is not None:
            torch.testing.assert_close(x2, x1, **tol(torch.float32))


def compiled_check_outputs(policy, x, t, cond) -> list:
    """What the compile tests compare between compiled and eager blocks: the shared-batch velocities, the
    "default" LoRA gradients of a fixed linear loss, and a no-grad (rollout) velocity."""
    params = list(adapter_params(policy.transformer, POLICY).values())
    for p in params:
        p.grad = None
    v, v_ref, v_ema = shared_velocities(policy, x, t, cond, True, True)
    (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
    with torch.no_grad():
        v_roll = policy.velocity(x, t, cond)
    return [v.detach(), v_ref, v_ema, v_roll, *[p.grad.clone() for p in params if p.grad is not None]]
