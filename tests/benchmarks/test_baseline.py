"""The harness's baseline is the official code path: peft's own LoRA forward switched with set_adapter /
disable_adapters (no routing mask during any call), three calls, diffusers' default attention, the loss in
float64 from the torch backend, the Python SDE step; and fp32 weights under fp16 autocast with TF32 on CUDA."""
from dataclasses import replace

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from awm_fast.models.lora import EMA, POLICY, adapter_params
from awm_fast.models.routing import ROUTING
from awm_fast.ops.dispatch import resolve_backend
from benchmarks import _models, _official, _phases, _variants
from tests.tolerances import tol


class Spy:
    """Records, per LoRA layer call, whether a routing mask was set, and every adapter switch of the transformer."""

    def __init__(self, transformer, monkeypatch) -> None:
        self.masks: list[bool] = []
        self.switches: list[tuple[str, ...]] = []
        self.hooks = [m.register_forward_pre_hook(lambda *_: self.masks.append(ROUTING.mask is not None))
                      for m in transformer.modules() if isinstance(m, LoraLinear)]
        for name in ("set_adapter", "disable_adapters", "enable_adapters"):
            original = getattr(transformer, name)

            def record(*args, _name=name, _original=original):
                self.switches.append((_name, *args))
                return _original(*args)

            monkeypatch.setattr(transformer, name, record)


@pytest.fixture(scope="module")
def bench():
    return _phases.Bench(_models.model_spec("tiny"), torch.device("cpu"))


def _train(bench, variant, monkeypatch):
    """One training micro-batch of `variant`: (policy, spy, the loss dtypes and backends awm_loss was asked for)."""
    policy, attention = bench.policy(variant, log=lambda *_: None)
    spy = Spy(policy.transformer, monkeypatch)
    losses = []

    def awm_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        losses.append((kwargs.get("backend", "auto"), out.loss.dtype))
        return out

    from awm_fast.algorithms import awm as awm_algorithm  # the harness trains through the trainer's AWM loss

    real = awm_algorithm.awm_loss
    monkeypatch.setattr(awm_algorithm, "awm_loss", awm_loss)
    gen = torch.Generator().manual_seed(3)
    spec = bench.spec
    latents = torch.randn(spec.rollout_batch, *spec.latent, generator=gen)
    adv = torch.linspace(-1, 1, spec.rollout_batch)
    with _variants.ops_backend(variant.fused_ops):
        bench.train_micro_batch(policy, variant, latents, adv, torch.arange(spec.micro_batch), gen, 1)
    return policy, attention, spy, losses


def test_baseline_runs_peft_adapter_switching_and_a_float64_loss(bench, monkeypatch):
    policy, attention, spy, losses = _train(bench, _variants.BASELINE, monkeypatch)
    assert isinstance(policy, _official.PeftSwitchedPolicy)
    layers = sum(isinstance(m, LoraLinear) for m in policy.transformer.modules())
    assert len(spy.masks) == 3 * layers and not any(spy.masks)  # three calls, peft's forward in every layer
    # the official switches: reference with the adapters disabled, EMA with set_adapter("ema") and back
    assert spy.switches == [("disable_adapters",), ("enable_adapters",), ("set_adapter", EMA), ("set_adapter", POLICY)]
    assert losses == [("torch", torch.float64)]
    assert "diffusers default" in attention
    assert {type(p).__name__ for p in policy.transformer.attn_processors.values()} == {"JointAttnProcessor2_0"}
    # the LoRA gradient is the policy adapter's, and the switches left "default" active and trainable
    assert all(p.grad is not None for p in adapter_params(policy.transformer, POLICY).values())
    assert all(p.grad is None and not p.requires_grad for p in adapter_params(policy.transformer, EMA).values())
    with _variants.ops_backend(_variants.BASELINE.fused_ops):  # the Python SDE step of the rollout
        assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_fast_routes_the_lora_and_matches_the_baseline(bench, monkeypatch):
    fast = replace(_variants.FAST, compile_blocks=False)
    policy, _, spy, losses = _train(bench, fast, monkeypatch)
    layers = sum(isinstance(m, LoraLinear) for m in policy.transformer.modules())
    assert len(spy.masks) == 2 * layers and all(spy.masks) and spy.switches == []  # two routed calls
    assert losses == [("auto", losses[0][1])]
    grads = [p.grad.clone() for p in adapter_params(policy.transformer, POLICY).values()]
    base, _, _, _ = _train(bench, _variants.BASELINE, monkeypatch)  # same seed, weights and rows on CPU (float32)
    for g_fast, (key, p) in zip(grads, adapter_params(base.transformer, POLICY).items()):
        torch.testing.assert_close(p.grad, g_fast, **tol(torch.float32), msg=key)


def test_baseline_precision_is_the_official_mixed_precision():
    dtype, autocast = _variants.precision(_variants.BASELINE, torch.device("cuda"))
    assert dtype == torch.float32 and autocast is _official.official_mixed_precision
    assert _variants.precision(_variants.FAST, torch.device("cuda"))[0] == torch.bfloat16
    before = torch.backends.cuda.matmul.allow_tf32
    with _official.official_mixed_precision("cpu"):  # the same context on CPU tensors (fp16 autocast there)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.float16
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_peft_adapter_rejects_an_unknown_adapter(bench):
    policy, _ = bench.policy(_variants.BASELINE, log=lambda *_: None)
    with pytest.raises(ValueError, match="'other'"):
        with _official.peft_adapter(policy.transformer, "other"):
            pass
