"""CUDA graphs of the no-grad transformer calls (rollout denoising steps, evaluation, the shared-batch forward).

A denoising step calls the transformer with the same shapes every time: one CUDA graph per (shapes, dtype)
is captured after two warm-up calls on a side stream and then replayed, with x, t, the conditioning and the
LoRA routing mask copied into the graph's static input buffers (a few MB) and the output cloned out. Replay
skips Python, dynamo's guard checks and the per-kernel launch cost. All graphs share one memory pool.
Calls that need autograd (the policy rows in training) never use a graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WARMUP_CALLS = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static buffers: x, t, embeds, pooled, mask
    out: torch.Tensor


class VelocityGraphs:
    """forward(x, t, embeds, pooled, mask) -> v replayed from CUDA graphs keyed by the inputs' shapes/dtypes."""

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device (sample.cuda_graphs=true on a machine without one)")
        self.forward = forward
        self.captured: dict[tuple, _Captured] = {}
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise ValueError("VelocityGraphs replays no-grad calls only (call it under torch.no_grad())")
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in inputs)
        entry = self.captured.get(key)
        if entry is None:
            entry = self.captured[key] = self._capture(inputs)
        for buffer, value in zip(entry.inputs, inputs):
            buffer.copy_(value)
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(a.clone() for a in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile, autotune and allocator state settle outside capture
            for _ in range(WARMUP_CALLS):
                self.forward(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(*static)
        return _Captured(graph, static, out)
