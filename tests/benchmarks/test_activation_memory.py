"""Saved activations measured on the meta device equal the same measurement on the real (tiny, CPU) model, fused
attention saves less than math attention, and the preset's micro-batch call is what is measured."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from awm_fast.config import load_config
from awm_fast.models.lora import add_adapters
from awm_fast.models.policy import Conditioning, FlowPolicy
from benchmarks import _meta, _models, activation_memory, family_flops

TARGETS = load_config("geneval_sd35m").model.lora_targets


def _tiny_call(device, rows=3):
    torch.manual_seed(0)
    with torch.device(device):
        model = _models.transformer_class(_models.model_spec("tiny"))(**_models.TINY_CONFIG).requires_grad_(False)
        add_adapters(model, rank=4, alpha=8, init="gaussian", targets=TARGETS)
    policy = FlowPolicy(model, None, None, (16, 8, 8), torch.device("cpu"), torch.float32)
    cfg = _models.TINY_CONFIG
    x, t = torch.randn(rows, 16, 8, 8, device=device), torch.rand(rows, device=device)
    cond = Conditioning(torch.randn(rows, 6, cfg["joint_attention_dim"], device=device),
                        torch.randn(rows, cfg["pooled_projection_dim"], device=device))
    return model, lambda: policy.velocity(x, t, cond)


def test_meta_measurement_equals_the_real_models():
    model, call = _tiny_call("cpu")
    with sdpa_kernel(SDPBackend.MATH):
        real = _meta.saved_activation_bytes(model, call, dtype=None, attention="math")
    meta = _meta.saved_activation_bytes(*_tiny_call("meta"), dtype=None, attention="math")
    assert meta == real and real["bytes"] > 0


def test_fused_attention_saves_less_than_math():
    fused = _meta.saved_activation_bytes(*_tiny_call("meta", rows=4), dtype=torch.bfloat16, attention="fused")
    math = _meta.saved_activation_bytes(*_tiny_call("meta", rows=4), dtype=torch.bfloat16, attention="math")
    assert 0 < fused["bytes"] < math["bytes"]


def test_the_presets_micro_batch_is_measured(monkeypatch):
    monkeypatch.setattr(family_flops, "architecture", lambda cfg: ("SD3Transformer2DModel", _models.TINY_CONFIG))
    monkeypatch.setattr(family_flops, "latent_shape", lambda cfg: (16, 8, 8))
    monkeypatch.setattr(family_flops, "text_len", lambda cfg: 6)
    r = activation_memory.measure("geneval_sd35m")
    assert r["rows"] == 3 * 6 and r["dtype"] == "bfloat16"
    fused, math = (r["saved_activations"][a]["bytes"] for a in ("fused", "math"))
    assert 0 < fused < math
    md = activation_memory.markdown(r)
    assert "measured, meta" in md and "counted" in md and "18-row" in md
