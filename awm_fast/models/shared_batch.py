"""Policy, reference and EMA velocities for the same training rows: three calls, or two with a shared batch.

Three calls (the official code): v = f_{base + default}(x), v_ref = f_base(x), v_ema = f_{base + ema}(x).

Shared batch: the policy call with autograd (ordinary activations, so gradient checkpointing applies as in the
three calls), and ONE no-grad call over the frozen rows stacked, [reference; ema] (routing mask (0, 0) for the
reference rows, (0, 1) for the EMA rows, models.routing). That second call has fixed shapes and no autograd:
the call CUDA graphs replay. With only one of the two needed it is that one call; with neither, the policy
call alone.

Cost per micro-batch of R rows, with F(n) the forward FLOPs over n rows (linear in n: every matmul and the
attention are per row), G(R) the policy backward (the checkpointed recompute inside it when enabled), and
k = [need_ref] + [need_ema]:

    three calls:   F(R) + G(R) + k F(R)
    shared batch:  F(R) + G(R) + F(k R)  =  the same FLOPs,   in 1 + min(k, 1) transformer calls (not 1 + k)

The LoRA products follow the routing descriptor (models.routing): a policy call runs the "default" product
(rank r), and the reference-only, EMA-only and [reference; ema] calls run only the "ema" product (masked to zero on
reference rows), so the two sides match term for term (tested with FlopCounterMode).
"""
from __future__ import annotations

import torch

from awm_fast.models.lora import EMA
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.routing import BASE, routing_mask


def separate_velocities(policy: FlowPolicy, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        need_ref: bool, need_ema: bool):
    """Three calls: (v with grad, v_ref or None, v_ema or None)."""
    with torch.no_grad():
        v_ref = policy.velocity(x, t, cond, adapter=None) if need_ref else None
        v_ema = policy.velocity(x, t, cond, adapter=EMA) if need_ema else None
    return policy.velocity(x, t, cond), v_ref, v_ema


def frozen_velocities(policy: FlowPolicy, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      need_ref: bool, need_ema: bool):
    """(v_ref or None, v_ema or None) from one no-grad call over the [reference; ema] rows (or the one needed)."""
    groups = [g for g, need in ((BASE, need_ref), (EMA, need_ema)) if need]
    if not groups:
        return None, None
    rows = x.shape[0]
    if t.dim() == 0:
        t = t.expand(rows)
    with torch.no_grad():
        if len(groups) == 1:
            out = [policy.velocity(x, t, cond, adapter=groups[0])]
        else:
            key = ("shared", rows, x.device)
            if key not in policy._masks:
                policy._masks[key] = routing_mask([(g, rows) for g in groups], x.device)
            both = Conditioning.cat([cond, cond])
            out = list(policy.routed_velocity(torch.cat([x, x]), torch.cat([t, t]), both,
                                              policy._masks[key]).split(rows))
    return (out.pop(0) if need_ref else None), (out.pop(0) if need_ema else None)


def shared_velocities(policy: FlowPolicy, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      need_ref: bool, need_ema: bool):
    """The policy call with grad and one no-grad call over [ref; ema] rows: (v differentiable in the "default"
    LoRA, v_ref or None, v_ema or None), equal to `separate_velocities`."""
    v_ref, v_ema = frozen_velocities(policy, x, t, cond, need_ref, need_ema)
    return policy.velocity(x, t, cond), v_ref, v_ema
