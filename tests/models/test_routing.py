"""Tensor LoRA routing equals peft's own adapter switching (values and gradients, float64), row by row."""
import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, get_peft_model_state_dict
from torch.utils.flop_counter import FlopCounterMode

from awm_fast.models.lora import EMA, POLICY, adapter_params, add_adapters
from awm_fast.models.routing import SCALES, RoutedLoraLinear, enable_routing, routed, routing_mask
from awm_fast.families.digits import tiny_transformer_config
from tests.tolerances import tol

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ROWS = 3


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    add_adapters(m, rank=4, alpha=8, init="gaussian", targets=TARGETS)
    m.double()
    with torch.no_grad():  # distinct non-zero deltas for both adapters
        for name in (POLICY, EMA):
            for p in adapter_params(m, name).values():
                p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs(rows: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(rows, 1, 8, 8, generator=gen, dtype=torch.float64),
                encoder_hidden_states=torch.randn(rows, 2, 32, generator=gen, dtype=torch.float64),
                pooled_projections=torch.randn(rows, 32, generator=gen, dtype=torch.float64),
                timestep=torch.rand(rows, generator=gen, dtype=torch.float64) * 1000, return_dict=False)


def _peft_call(model, adapter, inputs):
    """The oracle: peft's forward with its own adapter state."""
    if adapter is None:
        model.disable_adapters()
    else:
        model.set_adapter(adapter)
    try:
        return model(**inputs)[0]
    finally:
        model.enable_adapters()
        model.set_adapter(POLICY)


def test_every_lora_layer_is_routed(model):
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all(isinstance(m, RoutedLoraLinear) for m in layers)
    assert enable_routing(model) == len(layers)  # idempotent


@pytest.mark.parametrize("adapter", [POLICY, EMA, None])
def test_routed_call_equals_peft_adapter_switching(model, adapter):
    inputs = _inputs(ROWS)
    with routed(routing_mask([(adapter, ROWS)], "cpu", torch.float64)):
        got = model(**inputs)[0]
    torch.testing.assert_close(got, _peft_call(model, adapter, inputs), **tol(torch.float64))


def test_mixed_rows_equal_their_own_calls(model):
    inputs = _inputs(ROWS)
    stacked = {k: torch.cat([v] * 3) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with routed(routing_mask([(POLICY, ROWS), (None, ROWS), (EMA, ROWS)], "cpu", torch.float64)):
        got = model(**stacked)[0].split(ROWS)
    for part, adapter in zip(got, (POLICY, None, EMA)):
        torch.testing.assert_close(part, _peft_call(model, adapter, inputs), **tol(torch.float64))


def test_policy_gradients_equal_peft(model):
    inputs = _inputs(ROWS)
    params = list(adapter_params(model, POLICY).values())
    grads = []
    for use_routing in (True, False):
        for p in params:
            p.grad = None
        if use_routing:
            with routed(routing_mask([(POLICY, ROWS)], "cpu", torch.float64)):
                out = model(**inputs)[0]
        else:
            out = _peft_call(model, POLICY, inputs)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in params])
    assert sum(bool(g.any()) for g in grads[0]) > len(params) // 2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol(torch.float64))
    assert all(p.grad is None for p in adapter_params(model, EMA).values())


def test_rows_without_the_policy_adapter_give_it_no_gradient(model):
    inputs = _inputs(ROWS)
    params = list(adapter_params(model, POLICY).values())
    with routed(routing_mask([(None, 1), (EMA, ROWS - 1)], "cpu", torch.float64)):
        model(**inputs)[0].square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in params)


def test_bad_masks_and_names_are_clear_errors(model):
    with pytest.raises(ValueError, match="adapter='old'"):
        routing_mask([("old", 2)], "cpu")
    with pytest.raises(ValueError, match=r"shape \(rows, 2\), got \(3,\)"):
        with routed(torch.ones(3)):
            pass
    with pytest.raises(RuntimeError):  # the mask's rows must match the call's rows
        with routed(routing_mask([(POLICY, ROWS + 1)], "cpu", torch.float64)):
            model(**_inputs(ROWS))


def test_dropout_is_refused():
    m = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    for name in (POLICY, EMA):
        m.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["to_q"]), adapter_name=name)
    with pytest.raises(ValueError, match="dropout"):
        enable_routing(m)


def _no_grad_flops(model, mask, inputs, adapters=None):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, routed(mask, adapters):
        out = model(**inputs)[0]
    return counter.get_total_flops(), out


def test_calls_run_only_the_adapters_their_rows_use(model):
    """A policy-only or EMA-only call runs one rank-r product per layer, a reference call no more than the
    [reference; ema] call's per row; a mask without a descriptor (a copy) runs both; values are unchanged."""
    inputs = _inputs(ROWS)
    layers = [m for m in model.modules() if isinstance(m, RoutedLoraLinear)]
    tokens = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: tokens[id(mod)].append(args[0].shape[:-1].numel()))
             for m in layers]
    try:
        _no_grad_flops(model, routing_mask([(POLICY, ROWS)], "cpu", torch.float64), inputs)
    finally:
        for h in hooks:
            h.remove()
    # one rank-r LoRA product (x A^T then h B^T) over every row of every layer, in FlopCounterMode's 2 m n k
    rank_r = sum(2 * n * 4 * (m.in_features + m.out_features) for m in layers for n in tokens[id(m)])
    for adapter in (POLICY, EMA, None):
        mask = routing_mask([(adapter, ROWS)], "cpu", torch.float64)
        one, got = _no_grad_flops(model, mask, inputs)
        both, copied = _no_grad_flops(model, mask.clone(), inputs)  # clone(): no descriptor, both adapters
        assert both - one == rank_r, adapter
        torch.testing.assert_close(got, _peft_call(model, adapter, inputs), **tol(torch.float64))
        torch.testing.assert_close(copied, got, **tol(torch.float64))
    stacked = {k: torch.cat([v] * 2) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    shared, _ = _no_grad_flops(model, routing_mask([(None, ROWS), (EMA, ROWS)], "cpu", torch.float64), stacked)
    ref, _ = _no_grad_flops(model, routing_mask([(None, ROWS)], "cpu", torch.float64), inputs)
    ema, _ = _no_grad_flops(model, routing_mask([(EMA, ROWS)], "cpu", torch.float64), inputs)
    assert shared == ref + ema
    named, _ = _no_grad_flops(model, routing_mask([(EMA, ROWS)], "cpu", torch.float64).clone(), inputs, [EMA])
    assert named == ema


def test_adapters_named_by_the_caller_are_checked(model):
    with pytest.raises(ValueError, match="'old'"):
        with routed(routing_mask([(POLICY, ROWS)], "cpu"), adapters=["old"]):
            pass


def test_scales_are_a_device_buffer_outside_every_state_dict(model):
    layer = next(m for m in model.modules() if isinstance(m, RoutedLoraLinear))
    scales = getattr(layer, SCALES)
    assert scales.dtype == torch.float64  # moved and cast with the module (the fixture's .double())
    torch.testing.assert_close(scales, torch.tensor([layer.scaling[POLICY], layer.scaling[EMA]], dtype=torch.float64))
    assert not any(SCALES in key for key in model.state_dict())
    for name in (POLICY, EMA):
        assert not any(SCALES in key for key in get_peft_model_state_dict(model, adapter_name=name))
    model.float()
    assert getattr(layer, SCALES).dtype == torch.float32
