"""The small official-recipe details of the training loop: prompts without replacement, KL terms only with
beta > 0, the float32 timestep, the scheduler's grid from the loaded policy."""
import collections

import pytest
import torch

from awm_fast.algorithms.awm import effective_ema_beta
from awm_fast.config import load_config
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.sampling.timesteps import sd3_grid
from awm_fast.train.trainer import plan_step


def test_prompts_are_drawn_without_replacement():
    for step in range(5):
        prompt_of, groups = plan_step(10, 10, 8, seed=3, step=step)
        assert sorted(collections.Counter(prompt_of.tolist()).values()) == [8] * 10  # each digit once, x group size
        for g in range(10):  # a group is one prompt
            assert prompt_of[groups == g].unique().numel() == 1
    prompt_of, _ = plan_step(10, 25, 2, seed=3, step=0)  # more groups than prompts: every prompt 2 or 3 times
    counts = collections.Counter(prompt_of.tolist())
    assert len(counts) == 10 and set(counts.values()) <= {4, 6}
    assert plan_step(100, 7, 3, seed=3, step=1)[0].unique().numel() == 7


def test_ema_kl_needs_beta_as_official():
    cfg = load_config(None, ["train.beta=0", "train.ema_beta=1"])
    assert effective_ema_beta(cfg.train) == 0.0
    cfg = load_config(None, ["train.beta=0", "train.ema_beta=1", "train.ema_kl_without_beta=true"])
    assert effective_ema_beta(cfg.train) == 1.0
    assert effective_ema_beta(load_config(None, ["train.beta=0.001", "train.ema_beta=0.5"]).train) == 0.5


class TimestepSpy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        self.timesteps = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        self.timesteps.append(timestep)
        return (hidden_states * 0,)


def test_transformer_timestep_is_float32_under_bf16():
    """1000 t goes in as float32 (official): in bf16, t = 0.97306 would reach the model as 972, not 973.06."""
    spy = TimestepSpy()
    policy = FlowPolicy(spy, None, None, (1, 2, 2), torch.device("cpu"), torch.bfloat16)
    t = sd3_grid(14, 3.0)[1:2].float()
    policy.velocity(torch.randn(1, 1, 2, 2), t, Conditioning(torch.randn(1, 2, 4), torch.randn(1, 4)), adapter=None)
    (ts,) = spy.timesteps
    assert ts.dtype == torch.float32 and ts.item() == pytest.approx(973.06, abs=0.01)
