"""LoRA adapters on a tiny SD3 transformer: reference = base, ema update, evaluation EMA, checkpoints."""
import pytest
import torch
from diffusers import SD3Transformer2DModel

from awm_fast.models.lora import EMA, POLICY, EvalEMA, adapter_params, add_adapters, update_ema_adapter
from awm_fast.models.routing import routed, routing_mask
from awm_fast.families.digits import tiny_transformer_config
from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    add_adapters(m, rank=4, alpha=8, init="gaussian", targets=TARGETS)
    with torch.no_grad():  # non-zero B so that the adapters change the output
        for p in adapter_params(m, POLICY).values():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _call(m, gen):
    x = torch.randn(3, 1, 8, 8, generator=gen)
    return m(hidden_states=x, encoder_hidden_states=torch.randn(3, 2, 32, generator=gen),
             pooled_projections=torch.randn(3, 32, generator=gen), timestep=torch.rand(3, generator=gen) * 1000,
             return_dict=False)[0]


def test_reference_is_the_base_model(model):
    torch.manual_seed(0)  # the same initial weights as the fixture's model, without adapters
    base = SD3Transformer2DModel(**tiny_transformer_config())
    with routed(routing_mask([(None, 3)], "cpu")):
        ref = _call(model, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref, _call(base, torch.Generator().manual_seed(1)))
    assert not torch.allclose(ref, _call(model, torch.Generator().manual_seed(1)))
    assert model.active_adapters() == [POLICY]
    assert all(p.requires_grad for p in adapter_params(model, POLICY).values())


def test_ema_adapter_update_rule(model):
    ema_before = {k: p.clone() for k, p in adapter_params(model, EMA).items()}
    theta = adapter_params(model, POLICY)
    d = update_ema_adapter(model, 100, rate=0.001, cap=0.3)
    assert d == pytest.approx(0.1)
    for k, p in adapter_params(model, EMA).items():
        torch.testing.assert_close(p, 0.1 * ema_before[k] + 0.9 * theta[k])
    assert update_ema_adapter(model, 10_000, rate=0.001, cap=0.3) == 0.3


def test_eval_ema_decay_and_swap(model):
    ema = EvalEMA(model)
    key, p = next(iter(adapter_params(model, POLICY).items()))
    start = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    assert ema.update(model) == pytest.approx(2 / 11)  # official: (1 + n) / (10 + n) at global step n = 1
    torch.testing.assert_close(ema.shadow[key], 2 / 11 * start + 9 / 11 * (start + 1))
    assert ema.update(model) == pytest.approx(3 / 12) and ema.updates == 2
    with ema.swapped_in(model):
        torch.testing.assert_close(p, ema.shadow[key])
    torch.testing.assert_close(p, start + 1)


def test_checkpoint_round_trip_in_diffusers_format(model, tmp_path):
    for i in range(3):
        save_checkpoint(tmp_path, i + 1, model, {"marker": i}, keep=2)
    ckpt = resolve_checkpoint(tmp_path)
    assert ckpt.name == "step_000003" and len(list((tmp_path / "checkpoints").iterdir())) == 2
    assert (ckpt / "default" / "pytorch_lora_weights.safetensors").is_file()
    saved = {k: p.clone() for k, p in adapter_params(model, POLICY).items()}
    with torch.no_grad():
        for p in adapter_params(model, POLICY).values():
            p.zero_()
    assert load_checkpoint(ckpt, model)["marker"] == 2
    for k, p in adapter_params(model, POLICY).items():
        torch.testing.assert_close(p, saved[k])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)


def test_sd3_missing_weights_one_line(monkeypatch, tmp_path):
    from awm_fast.families.sd3 import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot load SD3 weights from model.path") as info:
        load_pipeline("stabilityai/not-a-cached-model", torch.float32)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="via the folder"):
        load_pipeline(str(tmp_path), torch.float32)


SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13)))  # stabilityai/stable-diffusion-3.5-medium


def test_default_targets_give_the_official_191_lora_modules_on_sd35m():
    """The official lora_type "attn" on SD3.5-M (built on the meta device: no weights): 24 joint-attention blocks x
    8 projections, less the last block's to_add_out (context_pre_only) = 191; bare names would also take attn2.* of
    the 13 dual-attention blocks (243)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from awm_fast.config import SD3_LORA_TARGETS

    def lora_modules(targets):
        with torch.device("meta"):
            m = SD3Transformer2DModel(**SD35M_TRANSFORMER).requires_grad_(False)
            add_adapters(m, rank=32, alpha=64, init="gaussian", targets=targets)
        return [name for name, mod in m.named_modules() if isinstance(mod, LoraLinear)]

    official = lora_modules(SD3_LORA_TARGETS)
    assert len(official) == 191 and not any(".attn2." in n for n in official)
    assert len(lora_modules(TARGETS)) == 243
