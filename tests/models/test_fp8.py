"""FP8 frozen base projections (models.fp8, model.fp8=true) on the CPU (emulated: float8 storage upcast for the
product): the float8 linear against the exact product (per-row scales, input gradient only, no weight-gradient
GEMM, no saved input), the tiny SD3 and FLUX policies against the same policy in bf16 (velocity, AWM loss parts,
LoRA gradients within tests/tolerances.py MODEL_FP8), KL exactly 0 at step 0, and the refusals."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from awm_fast.config import ConfigError, load_config
from awm_fast.families.load import load_policy
from awm_fast.families.tiny import build_tiny_flux, build_tiny_sd3
from awm_fast.models import fp8
from awm_fast.models.fp8 import Float8Linear
from awm_fast.models.lora import EMA, POLICY, adapter_params, copy_adapter
from tests.models.test_bf16 import _cfg, _inputs, _update, rel
from tests.tolerances import FP8_LINEAR, MODEL_FP8

PROMPTS = ["a red cube", "two green balls", "a cat"]
KINDS = ["sd3", "flux"]


def _linear(gen: torch.Generator) -> torch.nn.Linear:
    linear = torch.nn.Linear(64, 48).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) / 8)
        linear.bias.copy_(torch.randn(48, generator=gen))
    return linear


def test_float8_linear_matches_the_product_and_skips_the_weight_gradient():
    gen = torch.Generator().manual_seed(0)
    linear = _linear(gen)
    layer = Float8Linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and not list(layer.parameters())[0].requires_grad
    x = (torch.randn(3, 5, 64, generator=gen) * torch.logspace(-2, 2, 5)[:, None]).requires_grad_(True)  # rows of
    saved = []  # very different scales: per-row scaling keeps each
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.shape == x.reshape(-1, 64).shape for t in saved)  # the input is not kept for backward
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    exact, exact_dx = linear(x.detach()), grad @ linear.weight
    assert rel(y, exact) < FP8_LINEAR and rel(x.grad, exact_dx) < FP8_LINEAR, (rel(y, exact), rel(x.grad, exact_dx))
    for row in range(5):  # each row's own scale: even the smallest rows are accurate
        assert rel(y[:, row] - linear.bias, exact[:, row] - linear.bias) < FP8_LINEAR
    # a row's result does not depend on the other rows of its batch
    with torch.no_grad():
        assert torch.equal(layer(x[:1].detach()), layer(x.detach())[:1])
    # forward + backward = two GEMMs of the forward's size: no weight-gradient GEMM
    counter = FlopCounterMode(display=False)
    with counter:
        layer(x).backward(grad)
    forward = 2 * 15 * 64 * 48
    assert counter.get_total_flops() == 2 * forward


def test_conversion_quantises_the_frozen_block_projections_only():
    """At a LoRA rank whose A / B are multiples of 16 (the digits preset's 16), both adapters' LoRA linears stay
    float32 nn.Linear; every frozen block projection becomes float8; the embedders outside the blocks stay."""
    from diffusers import SD3Transformer2DModel

    from awm_fast.models.lora import add_adapters
    from awm_fast.families.digits import tiny_transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    add_adapters(model, rank=16, alpha=32, init="gaussian", targets=["attn.to_q", "attn.to_k", "attn.to_v"])
    lora = {a: dict(adapter_params(model, a)) for a in (POLICY, EMA)}
    assert fp8.convert_to_fp8(model) > 0
    for adapter in (POLICY, EMA):  # both adapters, the frozen "ema" one too, untouched
        params = adapter_params(model, adapter)
        assert params.keys() == lora[adapter].keys() and all(p.dtype == torch.float32 for p in params.values())
    assert all(p.requires_grad for p in adapter_params(model, POLICY).values())
    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert all("lora_" in n or not n.startswith("transformer_blocks") for n, _ in linears)
    assert any(n.startswith("context_embedder") or n.startswith("time_text_embed") for n, _ in linears)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipes_fp8")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


def _fp8_policy(tmp_path, monkeypatch, kind, path, *extra):
    """(config, fp8 policy) with the fresh LoRA initialisation (B = 0: policy = reference = EMA)."""
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fp8").mkdir(exist_ok=True)
    cfg = _cfg(tmp_path / "fp8", kind, path, "bfloat16", "model.fp8=true", *extra)
    return cfg, load_policy(cfg, torch.device("cpu"), prompts=PROMPTS)


def _pair(tmp_path, monkeypatch, kind, path):
    """(bf16 config, bf16 policy, fp8 policy) with the same seeded random LoRA weights (both adapters)."""
    _, p8 = _fp8_policy(tmp_path, monkeypatch, kind, path)
    cfg = _cfg(tmp_path, kind, path, "bfloat16")
    p16 = load_policy(cfg, torch.device("cpu"), prompts=PROMPTS)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in (POLICY, EMA):
            ours, theirs = adapter_params(p16.transformer, adapter), adapter_params(p8.transformer, adapter)
            for name, w in ours.items():
                w.copy_(0.3 * torch.randn(w.shape, generator=g))
                theirs[name].copy_(w)
    return cfg, p16, p8


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fp8_lora_policy_matches_bf16(kind, pipes, tmp_path, monkeypatch):
    bounds = MODEL_FP8[kind]
    cfg, p16, p8 = _pair(tmp_path, monkeypatch, kind, pipes[kind])
    converted = [m for m in p8.transformer.modules() if isinstance(m, Float8Linear)]
    assert converted and all(m.weight.dtype == torch.float8_e4m3fn for m in converted)
    assert all(w.dtype == torch.float32 for n, w in p8.transformer.named_parameters() if "lora_" in n)
    x, t, cond = _inputs(p16)
    with torch.no_grad():
        v16, v8 = p16.velocity(x, t, cond), p8.velocity(x, t, cond)
        base16 = p16.velocity(x, t, cond, adapter=None)
    assert rel(v8, v16) < bounds["velocity"], rel(v8, v16)
    assert rel(v16, base16) > 2 * bounds["velocity"]  # the bound resolves the LoRA's contribution

    m16, g16 = _update(p16, cfg, cond, tmp_path, monkeypatch, "bf16")
    m8, g8 = _update(p8, cfg, cond, tmp_path, monkeypatch, "fp8")
    for key in ("loss", "mse", "kl", "kl_ema"):
        scale = m16["mse"] if key == "loss" else abs(m16[key])
        assert abs(m8[key] - m16[key]) < bounds["loss"] * scale, (key, m8[key], m16[key])
    assert m8["skipped"] == 0 and len(g8) == len(g16) and all(g.dtype == torch.float32 for g in g8)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    assert rel(flat(g8), flat(g16)) < bounds["grad"], rel(flat(g8), flat(g16))
    # the frozen base is untouched by the step: still float8, no parameter of it trains
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in converted)
    assert all(not w.requires_grad for n, w in p8.transformer.named_parameters() if "lora_" not in n)


@pytest.mark.slow
@pytest.mark.parametrize("shared_batch", ["true", "false"])
def test_fp8_kl_is_exactly_zero_at_step_0(shared_batch, pipes, tmp_path, monkeypatch):
    """Policy, reference and EMA through the same float8 weights: with the fresh adapters (B = 0) both KL terms
    are exactly 0; with equal non-zero adapters the EMA KL is (the reference one is not)."""
    cfg, p8 = _fp8_policy(tmp_path, monkeypatch, "sd3", pipes["sd3"], f"train.shared_batch={shared_batch}")
    cond = _inputs(p8)[2]
    metrics, _ = _update(p8, cfg, cond, tmp_path, monkeypatch, "fresh")
    assert metrics["kl"] == 0.0 and metrics["kl_ema"] == 0.0 and metrics["mse"] > 0
    with torch.no_grad():
        for w in adapter_params(p8.transformer, POLICY).values():
            w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    copy_adapter(p8.transformer, POLICY, EMA)
    metrics, _ = _update(p8, cfg, cond, tmp_path, monkeypatch, "equal")
    assert metrics["kl_ema"] == 0.0 and metrics["kl"] > 0


def test_fp8_refusals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8.9\+.*A100.*sm_80"):
        fp8.check_fp8(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8(torch.device("cuda", 0))  # H100: accepted
    monkeypatch.setattr(fp8, "E4M3", None)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.check_fp8(torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        load_config(None, ["model.fp8=true", "model.dtype=float32"])
    with pytest.raises(ConfigError, match="train.finetune"):
        load_config(None, ["model.fp8=true", "model.dtype=bfloat16", "train.finetune=full", "train.eval_ema=false"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        fp8.convert_to_fp8(torch.nn.Module())


@pytest.mark.slow
def test_fp8_blocks_compile_once():
    """Regional compile (aot_eager) of float8 blocks: the policy call with its backward and the no-grad calls
    equal eager ones; other batch sizes recompile nothing after the warm-up."""
    from tests.models.tiny_configs import compiled_after_warm_up
    from tests.models.test_compile import _policy, _rows as digit_rows

    policy = _policy(num_layers=1)  # the block kinds: test_compile.py
    fp8.convert_to_fp8(policy.transformer)
    params = list(adapter_params(policy.transformer, POLICY).values())

    def calls(n, seed):
        x, t, cond = digit_rows(n, seed)
        for p in params:
            p.grad = None
        v = policy.velocity(x, t, cond)
        v.square().mean().backward()
        with torch.no_grad():
            frozen = policy.velocity(x, t, cond, adapter=EMA)
        return [v.detach(), frozen, *[p.grad.clone() for p in params]]

    with compiled_after_warm_up(policy.transformer, calls):
        calls(5, 2)
