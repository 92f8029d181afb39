"""CUDA graphs of the no-grad transformer calls (rollout denoising steps, evaluation, the shared-batch forward).

A denoising step calls the transformer with the same shapes every time: one CUDA graph per key is captured
after two warm-up calls on a side stream and then replayed, with x, t, the conditioning and the LoRA routing
mask copied into the graph's static input buffers (a few MB) and the output cloned out. Replay skips Python,
dynamo's guard checks and the per-kernel launch cost. All graphs share one memory pool.
Calls that need autograd (the policy rows in training) never use a graph.

The key of a call is, per input, (shape, dtype, device), for a routing mask the LoRA products its descriptor
runs (models.routing.products_for), and any other host-side attribute routing set on it: the static mask buffer
carries the same attributes, so a graphed call runs only the adapters its rows use, as the eager call does (a
policy-only graph the "default" product, a reference / EMA / [ref; ema] graph the "ema" product), and a call
with other adapters gets its own graph.

Capture runs on a side stream (`torch.cuda.graph` captures on one of its own; the default stream refuses
capture). A capture that fails (an op that cannot be captured, a driver refusal) turns the graphs off: one log
line, and every later no-grad call runs eager.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from awm_fast.models.routing import DESCRIPTOR, products_for

logger = logging.getLogger(__name__)

WARMUP_CALLS = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static buffers: x, t, embeds, pooled, mask (with its descriptor)
    out: torch.Tensor


def input_key(a: torch.Tensor) -> tuple:
    """(shape, dtype, device, LoRA products of a routing mask's descriptor or None, the other host-side
    attributes of the tensor (name, value), sorted)."""
    descriptor = getattr(a, DESCRIPTOR, None)
    others = tuple(sorted((k, v if isinstance(v, (frozenset, tuple, str, int, type(None))) else repr(v))
                          for k, v in vars(a).items() if k != DESCRIPTOR))
    return tuple(a.shape), a.dtype, a.device, None if descriptor is None else products_for(descriptor), others


def static_copy(a: torch.Tensor) -> torch.Tensor:
    """A static input buffer for `a`: a clone carrying `a`'s host-side attributes, the routing descriptor among
    them (a clone alone drops them)."""
    buffer = a.clone()
    vars(buffer).update(vars(a))
    return buffer


def capture(forward: Callable[..., torch.Tensor], static: tuple[torch.Tensor, ...], pool):
    """(graph, out): WARMUP_CALLS calls of forward(*static) on a side stream, then one captured by
    `torch.cuda.graph` (on its own side stream) into the memory pool `pool`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, autotune and allocator state settle outside capture
        for _ in range(WARMUP_CALLS):
            forward(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward(*static)
    return graph, out


class VelocityGraphs:
    """forward(x, t, embeds, pooled, mask) -> v replayed from CUDA graphs keyed by `input_key` of each input;
    eager once a capture failed (`failed` holds the reason)."""

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device (sample.cuda_graphs=true on a machine without one)")
        self.forward = forward
        self.captured: dict[tuple, _Captured] = {}
        self.pool = None
        self.failed: str | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise ValueError("VelocityGraphs replays no-grad calls only (call it under torch.no_grad())")
        if self.failed is not None:
            return self.forward(*inputs)
        key = tuple(input_key(a) for a in inputs)
        entry = self.captured.get(key)
        if entry is None:
            static = tuple(static_copy(a) for a in inputs)
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph, out = capture(self.forward, static, self.pool)
            except RuntimeError as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                self.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                logger.warning(f"[cuda graphs] off: capture failed ({self.failed}); no-grad calls run eager")
                return self.forward(*inputs)
            entry = self.captured[key] = _Captured(graph, static, out)
        for buffer, value in zip(entry.inputs, inputs):
            buffer.copy_(value)
        entry.graph.replay()
        return entry.out.clone()
