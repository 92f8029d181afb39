"""The shared batch (the policy call + one [reference; ema] call) equals three separate calls: values and LoRA
gradients."""
import pytest
import torch
from diffusers import SD3Transformer2DModel

from awm_fast.models.lora import EMA, POLICY, adapter_params
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.routing import enable_checkpointing
from awm_fast.models.shared_batch import shared_velocities
from awm_fast.families.digits import tiny_transformer_config
from tests.models.shared_batch_check import assert_same_both_ways, both_ways
from tests.models.tiny_configs import add_distinct_adapters
from tests.tolerances import tol

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.fixture
def policy(gen):
    torch.manual_seed(0)
    m = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    add_distinct_adapters(m, TARGETS, gen)
    return FlowPolicy(m, encode=None, decode=None, latent_shape=(1, 8, 8), device=torch.device("cpu"))


def _rows(gen, n=5):
    return (torch.randn(n, 1, 8, 8, generator=gen), torch.rand(n, generator=gen),
            Conditioning(torch.randn(n, 2, 32, generator=gen), torch.randn(n, 32, generator=gen)))


@pytest.mark.parametrize("need_ref,need_ema", [(True, True), (True, False), (False, True), (False, False)])
def test_shared_equals_three_calls(policy, gen, need_ref, need_ema):
    x, t, cond = _rows(gen)
    results = both_ways(policy, x, t, cond, torch.randn(x.shape, generator=gen), need_ref, need_ema)
    assert_same_both_ways(results)
    (_, a_ref, a_ema, a_grads), (_, b_ref, b_ema, _) = results
    assert (a_ref is None) != need_ref and (a_ema is None) != need_ema
    assert all(x is None or not x.requires_grad for x in (b_ref, b_ema)) and all(g is not None for g in a_grads)
    assert all(p.grad is None for p in adapter_params(policy.transformer, EMA).values())


def test_shared_batch_keeps_no_graph_for_reference_and_ema_rows(policy, gen):
    x, t, cond = _rows(gen)
    v, v_ref, v_ema = shared_velocities(policy, x, t, cond, True, True)
    assert v.requires_grad and v.grad_fn is not None and not v_ref.requires_grad and not v_ema.requires_grad
    assert all(p.grad is None for p in adapter_params(policy.transformer, EMA).values())


def test_gradient_checkpointing_gives_the_same_gradients(policy, gen):
    x, t, cond = _rows(gen)
    params = list(adapter_params(policy.transformer, POLICY).values())
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(policy.transformer)
        for p in params:
            p.grad = None
        v, _, _ = shared_velocities(policy, x, t, cond, True, True)
        v.square().sum().backward()
        grads.append([p.grad.clone() for p in params])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g2, g1, **tol(torch.float32))
