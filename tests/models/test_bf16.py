"""The half-precision training path every SD3/FLUX preset runs (model.dtype=bfloat16: frozen base in bf16, the
transformer under autocast, LoRA or full-fine-tuning master weights in float32) against the same policy in
float32, on the tiny random-weight pipelines: velocities, the AWM loss and the gradients agree within bf16
rounding (tests/tolerances.py, MODEL_BF16), the trained weights stay float32 through an optimizer step, and
the exported weights load with the stock diffusers classes.

Differences are relative: ||a - b|| / ||b|| over the whole tensor (a 2-layer transformer in bf16 is not
elementwise-close at 1e-2 near zero crossings). Each bound is checked to be smaller than the effect it must
resolve (the trained weights' contribution to the velocity), so a bf16 path that dropped the LoRA or the
trained weights would fail.
"""
import pytest
import torch

from awm_fast.algorithms import update_loop
from awm_fast.algorithms.update_loop import MicroBatchRNG
from awm_fast.families.load import load_policy
from awm_fast.families.tiny import build_tiny_flux, build_tiny_sd3
from awm_fast.models.lora import EMA, POLICY, adapter_params
from awm_fast.models.policy import Conditioning
from tests.models.tiny_configs import tiny_model_config
from tests.tolerances import MODEL_BF16
from tests.train.hooked_cli import grad_dump_hook
from tests.algorithms.updates import update_on

PROMPTS = ["a red cube", "two green balls", "a cat"]
KINDS = ["sd3", "flux"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipes")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _cfg(tmp_path, kind, path, dtype, *extra):
    flux = ["model.text_tokens=16"] if kind == "flux" else []
    (tmp_path / dtype).mkdir(exist_ok=True)
    return tiny_model_config(tmp_path / dtype, kind, path, PROMPTS, f"model.dtype={dtype}", "run.device=cpu",
                             "model.attention_backend=sdpa_math", "train.beta=0.05", "train.ema_beta=0.05",
                             "train.micro_batch=2", "train.num_timesteps=2", *flux, *extra)


def _policies(tmp_path, monkeypatch, kind, path, *extra):
    """(float32 config, float32 policy, bfloat16 policy) with the same trained weights: the LoRA adapters ("default" and "ema")
    set to seeded random values, or, for full fine-tuning, the trained and EMA models moved off the base."""
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    dev = torch.device("cpu")
    cfg = _cfg(tmp_path, kind, path, "float32", *extra)
    p32 = load_policy(cfg, dev, prompts=PROMPTS)
    p16 = load_policy(_cfg(tmp_path, kind, path, "bfloat16", *extra), dev, prompts=PROMPTS)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if p32.models is None:
            for adapter in (POLICY, EMA):
                ours, theirs = adapter_params(p32.transformer, adapter), adapter_params(p16.transformer, adapter)
                for name, w in ours.items():
                    w.copy_(0.3 * torch.randn(w.shape, generator=g))
                    theirs[name].copy_(w)
        else:
            for adapter in (POLICY, EMA):
                for w in p32.models[adapter].parameters():
                    w.add_(0.1 * torch.randn(w.shape, generator=g) * w.abs().mean().clamp_min(1e-3))
                p16.models[adapter].load_state_dict(p32.models[adapter].state_dict())  # EMA: rounded to bf16
    return cfg, p32, p16


def _inputs(policy, rows=4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, *policy.latent_shape, generator=g)
    t = torch.rand(rows, generator=g) * 0.8 + 0.1
    cond = policy.encode([PROMPTS[i % len(PROMPTS)] for i in range(rows)])  # float32 embeddings for both
    return x, t, Conditioning(cond.embeds.float(), cond.pooled.float())


def _trained_params(policy):
    if policy.models is not None:
        return list(policy.transformer.parameters())
    return list(adapter_params(policy.transformer, POLICY).values())


def _update(policy, cfg, cond, tmp_path, monkeypatch, name):
    """One AWM update (3 velocities, the AWM loss, backward, AdamW step) on fixed rows (4 latents, `cond`);
    returns (metrics, the step's gradients as dumped before clipping)."""
    folder = tmp_path / f"grads_{name}"
    monkeypatch.setattr(update_loop, "GRADIENT_HOOKS", [grad_dump_hook(str(folder))])
    latents = torch.randn(4, *policy.latent_shape, generator=torch.Generator().manual_seed(11))
    advantages = torch.tensor([1.0, 0.5, 0.7, 1.2])
    params = _trained_params(policy)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    metrics = update_on(cfg, policy, latents, cond, advantages, policy.time_grid(4), MicroBatchRNG(5, 0), optimizer,
                        params).metrics()
    (dump,) = sorted(folder.glob("*.pt"))
    return metrics, torch.load(dump)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_lora_policy_matches_float32(kind, pipes, tmp_path, monkeypatch):
    tol = MODEL_BF16[kind]
    cfg, p32, p16 = _policies(tmp_path, monkeypatch, kind, pipes[kind])
    base = [w for n, w in p16.transformer.named_parameters() if "lora_" not in n]
    lora = [w for n, w in p16.transformer.named_parameters() if "lora_" in n]
    assert base and lora and all(w.dtype == torch.bfloat16 for w in base)
    assert all(w.dtype == torch.float32 for w in lora)  # LoRA weights train in float32
    x, t, cond = _inputs(p32)
    with torch.no_grad():
        v32, v16 = p32.velocity(x, t, cond), p16.velocity(x, t, cond)
        v32_base = p32.velocity(x, t, cond, adapter=None)
    assert v16.dtype == torch.bfloat16 and torch.isfinite(v16.float()).all()
    assert rel(v16, v32) < tol["velocity"], rel(v16, v32)
    assert rel(v32, v32_base) > 2 * tol["velocity"]  # the bound resolves the LoRA's contribution

    m32, g32 = _update(p32, cfg, cond, tmp_path, monkeypatch, "fp32")
    m16, g16 = _update(p16, cfg, cond, tmp_path, monkeypatch, "bf16")
    for key in ("loss", "mse", "kl", "kl_ema"):  # the loss on the scale of its mse part (advantages sum it)
        scale = m32["mse"] if key == "loss" else abs(m32[key])
        assert abs(m16[key] - m32[key]) < tol["loss"] * scale, (key, m16[key], m32[key])
    assert m32["kl"] > 0 and m32["kl_ema"] > 0 and m16["skipped"] == 0
    assert len(g16) == len(g32) == len(adapter_params(p16.transformer, POLICY))
    assert all(g.dtype == torch.float32 for g in g16)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    assert rel(flat(g16), flat(g32)) < tol["grad"], rel(flat(g16), flat(g32))
    # after the optimizer step: LoRA (both adapters) still float32, the frozen base still bf16 and untouched
    assert all(w.dtype == torch.float32 for n, w in p16.transformer.named_parameters() if "lora_" in n)
    assert all(w.dtype == torch.bfloat16 and not w.requires_grad for w in base)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_bf16_lora_loads_in_the_stock_pipeline(kind, pipes, tmp_path, monkeypatch):
    """The adapter trained on a bf16 base is saved in float32 and gives, loaded by the stock diffusers pipeline
    in bf16, the velocity our bf16 policy computes."""
    tol = MODEL_BF16[kind]
    from safetensors.torch import load_file

    from awm_fast.families.flux import flux_call, load_flux_pipeline
    from awm_fast.families.sd3 import load_pipeline
    from awm_fast.train.checkpoint import save_lora

    _, _, p16 = _policies(tmp_path, monkeypatch, kind, pipes[kind])
    folder = tmp_path / "export"
    save_lora(p16.transformer, POLICY, folder)
    (weights,) = folder.glob("*.safetensors")
    saved = load_file(str(weights))
    assert len(saved) == len(adapter_params(p16.transformer, POLICY))
    assert all(w.dtype == torch.float32 for w in saved.values())
    pipe = (load_flux_pipeline if kind == "flux" else load_pipeline)(str(pipes[kind]), torch.bfloat16)
    pipe.load_lora_weights(str(folder))
    x, t, cond = _inputs(p16, rows=len(PROMPTS))
    c16 = Conditioning(cond.embeds.bfloat16(), cond.pooled.bfloat16())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = p16.velocity(x, t, cond)
        if kind == "flux":
            theirs = flux_call(pipe.transformer, x.bfloat16(), t.float(), c16, guidance=p16.call.keywords["guidance"])
        else:
            theirs = pipe.transformer(hidden_states=x.bfloat16(), encoder_hidden_states=c16.embeds,
                                      pooled_projections=c16.pooled, timestep=t.float() * 1000,
                                      return_dict=False)[0]
        base = p16.velocity(x, t, cond, adapter=None)
    assert rel(theirs, ours) < tol["velocity"], rel(theirs, ours)
    assert rel(ours, base) > 2 * tol["velocity"]


def test_bf16_full_finetune_matches_float32_and_keeps_float32_master_weights(pipes, tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel

    from awm_fast.train.checkpoint import save_model

    tol = MODEL_BF16["sd3"]
    cfg, p32, p16 = _policies(tmp_path, monkeypatch, "sd3", pipes["sd3"], "train.finetune=full",
                              "train.eval_ema=false")
    trained, reference, ema = p16.models[POLICY], p16.models[None], p16.models[EMA]
    assert all(w.dtype == torch.float32 and w.requires_grad for w in trained.parameters())  # master weights
    assert all(w.dtype == torch.bfloat16 for m in (reference, ema) for w in m.parameters())
    x, t, cond = _inputs(p32)
    with torch.no_grad():
        v32, v16 = p32.velocity(x, t, cond), p16.velocity(x, t, cond)
        v32_ref = p32.velocity(x, t, cond, adapter=None)
    assert v16.dtype == torch.bfloat16
    assert rel(v16, v32) < tol["velocity"], rel(v16, v32)
    assert rel(v32, v32_ref) > 2 * tol["velocity"]  # the bound resolves the trained weights' move

    m32, g32 = _update(p32, cfg, cond, tmp_path, monkeypatch, "fp32")
    before = {n: w.detach().clone() for n, w in trained.named_parameters()}
    m16, g16 = _update(p16, cfg, cond, tmp_path, monkeypatch, "bf16")
    for key in ("loss", "mse", "kl", "kl_ema"):  # the loss on the scale of its mse part (advantages sum it)
        scale = m32["mse"] if key == "loss" else abs(m32[key])
        assert abs(m16[key] - m32[key]) < tol["loss"] * scale, (key, m16[key], m32[key])
    assert len(g16) == len(g32) == len(list(trained.parameters())) and all(g.dtype == torch.float32 for g in g16)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    assert rel(flat(g16), flat(g32)) < tol["grad"], rel(flat(g16), flat(g32))
    # the step's updates are kept in float32: most are below bf16's spacing at the weight (2^-8 |w|), so bf16
    # master weights would have dropped them
    assert all(w.dtype == torch.float32 for w in trained.parameters())
    delta = torch.cat([(w - before[n]).flatten() for n, w in trained.named_parameters()])
    weight = torch.cat([before[n].flatten() for n, _ in trained.named_parameters()])
    small = (delta != 0) & (delta.abs() < weight.abs() * 2.0 ** -9)
    assert (delta != 0).float().mean() > 0.5 and small.sum() > 0
    assert all(w.dtype == torch.bfloat16 and not w.requires_grad for m in (reference, ema) for w in m.parameters())

    # export: the float32 trained weights load with the stock diffusers class and give the same velocity
    folder = tmp_path / "full_export"
    save_model(trained, trained.state_dict(), folder)
    loaded = SD3Transformer2DModel.from_pretrained(str(folder))
    assert all(w.dtype == torch.float32 for w in loaded.parameters())
    for n, w in loaded.named_parameters():
        assert torch.equal(w, dict(trained.named_parameters())[n])
