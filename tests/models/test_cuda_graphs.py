"""CUDA-graph replay of the no-grad transformer calls: equal to the direct calls; graphs keyed by the routing
descriptor run only the adapters their rows use (checked on the CPU with a fake capture); a failed capture falls
back to eager calls with one line; clear errors off CUDA."""
import logging

import pytest
import torch

from awm_fast.config import ConfigError, load_config
from awm_fast.models import cuda_graphs, routing
from awm_fast.models.cuda_graphs import VelocityGraphs
from awm_fast.models.lora import EMA, POLICY
from awm_fast.models.policy import Conditioning
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.timesteps import time_grid
from tests.models.tiny_configs import tiny_lora_policy
from tests.tolerances import tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_rollout_equals_direct_calls():
    device = torch.device("cuda")
    policy = tiny_lora_policy(device)
    gen = torch.Generator().manual_seed(1)
    batches = [Conditioning(torch.randn(4, 2, 32, generator=gen).to(device), torch.randn(4, 32, generator=gen).to(device))
               for _ in range(2)]
    grid = time_grid(6, 3.0).to(device)

    def rollouts():
        out = []
        for adapter in (POLICY, None, EMA):
            for cond in batches:  # several batches and adapters through the same captured graph
                g = torch.Generator(device=device).manual_seed(2)
                out.append(sample_latents(policy, cond, grid, sampler="euler_maruyama", noise_level=0.7, generator=g,
                                          adapter=adapter)[0])
        return out

    direct = rollouts()
    policy.graphs = VelocityGraphs(policy.forward)
    graphed = rollouts()
    # one shape: a graph per routing descriptor (policy: the "default" product; reference and EMA: the "ema"
    # product), every batch replays them
    assert {key[4][3] for key in policy.graphs.captured} == {(0, 1), (1, 2)} and len(policy.graphs.captured) <= 3
    for a, b in zip(graphed, direct):
        torch.testing.assert_close(a, b, **tol(torch.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_graphs_without_cuda_are_a_clear_error():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        VelocityGraphs(lambda *a: None)


def test_graphs_and_a_cudagraph_compile_mode_are_refused():
    with pytest.raises(ConfigError, match="sample.cuda_graphs=true with model.compile_mode='reduce-overhead'"):
        load_config(None, ["sample.cuda_graphs=true", "model.compile=true", "model.compile_mode=reduce-overhead"])
    load_config(None, ["sample.cuda_graphs=true", "model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"])


class FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: replay reruns the captured call on the static buffers."""

    def __init__(self, forward, static, out):
        self.forward, self.static, self.out = forward, static, out

    def replay(self):
        self.out.copy_(self.forward(*self.static))


@pytest.fixture
def cpu_graphs(monkeypatch):
    """VelocityGraphs on the CPU: `capture` runs the call once into a FakeGraph; records the LoRA products
    (models.routing) each transformer call runs, per phase ("capture" / "replay")."""
    seen = {"capture": [], "replay": []}
    phase = ["eager"]
    original = routing.RoutedLoraLinear.forward

    def spy(self, x, *args, **kwargs):
        if routing.ROUTING.mask is not None and phase[0] in seen:
            seen[phase[0]].append(routing.ROUTING.products)
        return original(self, x, *args, **kwargs)

    def fake_capture(forward, static, pool):
        phase[0] = "capture"
        out = forward(*static)
        phase[0] = "replay"
        return FakeGraph(forward, static, out), out

    monkeypatch.setattr(routing.RoutedLoraLinear, "forward", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs, "capture", fake_capture)
    return seen, phase


def _batch(gen, rows=3):
    return (torch.randn(rows, 1, 8, 8, generator=gen), torch.rand(rows, generator=gen),
            Conditioning(torch.randn(rows, 2, 32, generator=gen), torch.randn(rows, 32, generator=gen)))


def test_a_graphed_call_runs_only_the_adapters_its_rows_use(gen, cpu_graphs):
    """The captured copy of a routing mask keeps its descriptor: a policy graph runs the "default" product
    alone, a reference / EMA graph the "ema" product alone, as the eager calls do; one graph per product set."""
    seen, phase = cpu_graphs
    policy = tiny_lora_policy()
    x, t, cond = _batch(gen)
    with torch.no_grad():
        eager = {a: policy.velocity(x, t, cond, adapter=a) for a in (POLICY, None, EMA)}
        policy.graphs = VelocityGraphs(policy.forward)
        for adapter, products in ((POLICY, (0, 1)), (None, (1, 2)), (EMA, (1, 2))):
            seen["capture"].clear(), seen["replay"].clear()
            phase[0] = "replay"
            graphed = policy.velocity(x, t, cond, adapter=adapter)
            torch.testing.assert_close(graphed, eager[adapter], **tol(torch.float32))
            ran = seen["capture"] + seen["replay"]
            assert ran and set(ran) == {products}, (adapter, set(ran))
    assert {key[4][3] for key in policy.graphs.captured} == {(0, 1), (1, 2)}


def test_a_failed_capture_falls_back_to_eager_with_one_line(gen, cpu_graphs, monkeypatch, caplog):
    def refuse(forward, static, pool):
        raise RuntimeError("operation not permitted when stream is capturing (forced for the test)")

    monkeypatch.setattr(cuda_graphs, "capture", refuse)
    caplog.set_level(logging.INFO, logger="awm_fast")
    policy = tiny_lora_policy()
    x, t, cond = _batch(gen)
    with torch.no_grad():
        eager = policy.velocity(x, t, cond)
        policy.graphs = VelocityGraphs(policy.forward)
        outs = [policy.velocity(x, t, cond, adapter=a) for a in (POLICY, POLICY, EMA)]
    torch.testing.assert_close(outs[0], eager, **tol(torch.float32))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[cuda graphs]")]
    assert len(lines) == 1 and "capture failed" in lines[0] and "operation not permitted" in lines[0], lines
    assert policy.graphs.failed is not None and not policy.graphs.captured
