"""CUDA-graph replay of the no-grad transformer calls: equal to the direct calls; clear errors off CUDA."""
import pytest
import torch

from awm_fast.algo.timesteps import time_grid
from awm_fast.config import ConfigError, load_config
from awm_fast.models.cuda_graphs import VelocityGraphs
from awm_fast.models.lora import EMA, POLICY
from awm_fast.models.policy import Conditioning
from awm_fast.sampling.rollout import sample_latents
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
    assert len(policy.graphs.captured) == 1  # one shape, every adapter and batch replays it
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
