"""Attention backends agree with sdpa_math; our SD3 processor equals diffusers' on the whole transformer."""
import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel

from awm_fast.models.attention import (BACKENDS, attention, backend_available, resolve_attention_backend,
                                       use_attention_backend)
from tests.tolerances import tol

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_agree_with_math(gen, backend, dtype):
    if not backend_available(backend, DEVICE, dtype):
        pytest.skip(f"{backend} not available for {DEVICE.type}/{dtype}")
    q, k, v = (torch.randn(2, 3, 37, 16, generator=gen).to(DEVICE) for _ in range(3))
    ref = attention(q.double(), k.double(), v.double(), "sdpa_math")
    qd, kd, vd = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out = attention(qd, kd, vd, backend)
    torch.testing.assert_close(out.double(), ref, **tol(dtype))
    out.float().square().sum().backward()  # every backend used for training has a backward pass
    assert all(torch.isfinite(x.grad).all() for x in (qd, kd, vd))


def test_processor_matches_diffusers_default(gen):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
                                  qk_norm="rms_norm", dual_attention_layers=(0,))
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
              pooled_projections=torch.randn(2, 8, generator=gen), timestep=torch.tensor([100.0, 900.0]), return_dict=False)
    with torch.no_grad():
        expected = model(**kw)[0]
        for backend in ("sdpa_math", "sdpa_flash"):
            use_attention_backend(model, backend)
            torch.testing.assert_close(model(**kw)[0], expected, **tol(torch.float32))


def test_auto_and_fallback_say_so_in_one_line(caplog):
    caplog.set_level(logging.INFO, logger="awm_fast")
    assert resolve_attention_backend("auto", torch.device("cpu"), torch.float32) == "sdpa_flash"
    assert resolve_attention_backend("flash2", torch.device("cpu"), torch.float32) == "sdpa_flash"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "flash2 is not available" in lines[1] and all("\n" not in x for x in lines)
    with pytest.raises(ValueError, match="model.attention_backend='flash9'"):
        resolve_attention_backend("flash9", torch.device("cpu"), torch.float32)


def test_a_backend_failing_its_probe_falls_back_with_one_line(caplog, monkeypatch):
    """A present backend that raises on this machine (forced: sdpa_flash) gives way to the next that runs."""
    import awm_fast.models.attention as attention_module

    real = attention_module.attention

    def broken_flash(q, k, v, backend):
        if backend == "sdpa_flash":
            raise RuntimeError("no kernel image is available for execution on the device (forced for the test)")
        return real(q, k, v, backend)

    monkeypatch.setattr(attention_module, "attention", broken_flash)
    caplog.set_level(logging.INFO, logger="awm_fast")
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu, torch.float32) == "sdpa_math"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sdpa_flash failed its probe" in warnings[0] and "no kernel image" in warnings[0]
    caplog.clear()
    assert resolve_attention_backend("sdpa_flash", cpu, torch.float32) == "sdpa_math"  # asked for explicitly
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sdpa_flash failed its probe" in warnings[0]


def test_a_backend_with_wrong_values_fails_its_probe(monkeypatch):
    import awm_fast.models.attention as attention_module

    real = attention_module.attention
    monkeypatch.setattr(attention_module, "attention",
                        lambda q, k, v, backend: real(q, k, v, backend) * (1.5 if backend == "sdpa_flash" else 1))
    reason = attention_module.probe_failure("sdpa_flash", torch.device("cpu"), torch.float32)
    assert reason is not None and "relative error" in reason
    monkeypatch.setattr(attention_module, "attention", real)
    assert attention_module.probe_failure("sdpa_flash", torch.device("cpu"), torch.float32) is None
