"""Policy, reference and EMA velocities for the same training rows: three calls, or one shared batch.

Three calls (the official code): v = f_{base + default}(x), v_ref = f_base(x), v_ema = f_{base + ema}(x).

Shared batch: ONE transformer call over the rows stacked three times, [policy; reference; ema]. The frozen
base weights run once over all 3R rows; each LoRA layer adds the "default" delta only to the policy rows
and the "ema" delta only to the EMA rows (the routing mask of models.routing: (1, 0), (0, 0), (0, 1)).
The call runs without autograd, so no activations of any row are kept; in backward the policy rows alone
are recomputed with the "default" adapter and back-propagated (as reentrant activation checkpointing does).
Cost: one batched 3R-row forward + an R-row forward and backward; memory: no stored activations during the
forward.
"""
from __future__ import annotations

import torch

from awm_fast.models.lora import EMA, POLICY, adapter_params
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.routing import BASE, routing_mask


def separate_velocities(policy: FlowPolicy, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        need_ref: bool, need_ema: bool):
    """Three calls: (v with grad, v_ref or None, v_ema or None)."""
    with torch.no_grad():
        v_ref = policy.velocity(x, t, cond, adapter=None) if need_ref else None
        v_ema = policy.velocity(x, t, cond, adapter=EMA) if need_ema else None
    return policy.velocity(x, t, cond), v_ref, v_ema


class _SharedBatch(torch.autograd.Function):
    """forward: the shared no-grad call; backward: recompute and back-propagate the policy rows only."""

    @staticmethod
    def forward(ctx, anchor, policy, x, t, cond, mask, repeats):
        stack = lambda a: torch.cat([a] * repeats)
        with torch.no_grad():
            v_all = policy.routed_velocity(stack(x), stack(t), Conditioning(stack(cond.embeds), stack(cond.pooled)),
                                           mask)
        ctx.policy, ctx.cond = policy, cond
        ctx.save_for_backward(x, t)
        rows = x.shape[0]
        v = v_all[:rows].clone()
        others = v_all[rows:]
        ctx.mark_non_differentiable(others)
        return v, others

    @staticmethod
    def backward(ctx, grad_v, _grad_others):
        x, t = ctx.saved_tensors
        with torch.enable_grad():
            v = ctx.policy.velocity(x, t, ctx.cond)
        torch.autograd.backward(v, grad_v)  # accumulates into the "default" LoRA parameters' .grad
        return (None,) * 7


def shared_velocities(policy: FlowPolicy, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      need_ref: bool, need_ema: bool):
    """One call over [policy; ref; ema] rows: (v differentiable in the "default" LoRA, v_ref, v_ema)."""
    rows = x.shape[0]
    if t.dim() == 0:
        t = t.expand(rows)
    groups = [POLICY] + ([BASE] if need_ref else []) + ([EMA] if need_ema else [])
    mask = routing_mask([(g, rows) for g in groups], x.device)
    anchor = next(iter(adapter_params(policy.transformer, POLICY).values()))
    v, others = _SharedBatch.apply(anchor, policy, x, t, cond, mask, len(groups))
    rest = list(others.split(rows)) if len(groups) > 1 else []
    v_ref = rest.pop(0) if need_ref else None
    v_ema = rest.pop(0) if need_ema else None
    return v, v_ref, v_ema
