"""The FLUX.2 [klein] family on a tiny random-weight Flux2KleinPipeline built and saved locally: training end to end,
the LoRA through Flux2KleinPipeline.load_lora_weights, the scheduler grid, the velocity convention and decode
against the pipeline's own denoising loop, the FLOP formula, the shared batch, the preset and guidance checks."""
import json

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.attention_dispatch import attention_backend
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from awm_fast.config import load_config
from awm_fast.families.flux2 import (LORA_TARGETS, REFERENCE_CONFIG, REFERENCE_CONFIG_9B, empirical_mu, flux2_call,
                                     forward_flops, latent_ids, pack, text_ids, unpack, unpatchify,
                                     training_memory_estimate)
from awm_fast.families.tiny.flux2 import TINY_TRANSFORMER, build_tiny_flux2
from awm_fast.models.pipeline import lora_parameter_count
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
from awm_fast.train.trainer import train
from tests.models.shared_batch_check import assert_same_both_ways, both_ways
from tests.models.tiny_configs import (add_distinct_adapters, assert_stock_pipeline_reproduces,
                                       base_policy_at, tiny_model_config)
from tests.tolerances import tol

PROMPTS = ["a red cube", "two green balls", "a cat"]
TEXT = 16  # model.text_tokens of the tiny runs (the chat template alone is 19 bytes: every prompt is cut to 16)


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory):
    return build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2") / "pipe")


def _cfg(tmp_path, model_path, *extra):
    targets = "model.lora_targets=[" + ",".join(LORA_TARGETS) + "]"
    return tiny_model_config(tmp_path, "flux2", model_path, PROMPTS, targets, f"model.text_tokens={TEXT}", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_flux2):
    """A 2-step run with the shared batch, compiled blocks (eager backend: dynamo's capture of every block) and
    gradient checkpointing; returns the run's tmp folder and summary."""
    tmp = tmp_path_factory.mktemp("flux2_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWM_FAST_CACHE", str(tmp / "cache"))
        cfg = _cfg(tmp, tiny_flux2, "train.lr=0.05", "train.shared_batch=true", "model.compile=true",
                   "model.compile_backend=eager", "train.gradient_checkpointing=true")
        summary = json.loads(train(cfg).read_text())
    return tmp, summary


@pytest.fixture(scope="module")
def base_policy(tmp_path_factory, tiny_flux2):
    tmp = tmp_path_factory.mktemp("flux2_policy")
    return base_policy_at(tmp, _cfg(tmp, tiny_flux2), PROMPTS)


@pytest.mark.slow
def test_trainer_runs_two_steps_on_tiny_flux2(trained):
    tmp, summary = trained
    assert summary["steps"] == 2 and "jpeg_kb" in summary["eval_after"]
    rows = [json.loads(x) for x in (tmp / "flux2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)


@pytest.mark.slow
def test_lora_loads_into_flux2_pipeline_and_reproduces_the_policy(trained, tiny_flux2, monkeypatch, gen):
    from awm_fast.families.flux2 import load_pipeline
    from awm_fast.families.load import load_policy

    tmp, _ = trained
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp / "cache"))
    policy = load_policy(_cfg(tmp, tiny_flux2), torch.device("cpu"), prompts=PROMPTS)
    load_checkpoint(resolve_checkpoint(tmp / "flux2"), policy.transformer)
    x, t = torch.randn(2, *policy.latent_shape, generator=gen), torch.rand(2, generator=gen)
    cond = policy.encode(PROMPTS[:2])
    with torch.no_grad():
        ours = policy.velocity(x, t, cond)
    assert_stock_pipeline_reproduces(load_pipeline(str(tiny_flux2), torch.float32), tmp / "flux2", flux2_call, ours,
                                     x, t, cond)


def test_grid_is_the_pipeline_schedulers(base_policy, tiny_flux2):
    """Flux2KleinPipeline: set_timesteps(sigmas=linspace(1, 1/N, N), mu=compute_empirical_mu(L, N)) for L = h w."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    from awm_fast.families.flux2 import load_pipeline

    pipe = load_pipeline(str(tiny_flux2), torch.float32)
    _, h, w = base_policy.latent_shape
    for n in (1, 4, 14, 50):
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=n)
        assert empirical_mu(h * w, n) == pytest.approx(mu, abs=1e-12)
        retrieve_timesteps(pipe.scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        torch.testing.assert_close(base_policy.time_grid(n), pipe.scheduler.sigmas.double(), atol=0, rtol=0)
    assert empirical_mu(5000, 4) == pytest.approx(compute_empirical_mu(5000, 4))  # the L > 4300 branch


def test_rollout_and_decode_equal_the_pipelines_denoising_loop(base_policy, tiny_flux2, gen):
    """Our Euler steps x <- x + (sigma' - sigma) v over the policy's grid, then policy.decode, equal
    Flux2KleinPipeline(latents=x, prompt_embeds=...) end to end (packing, ids, timestep, sign, BN and decode)."""
    from awm_fast.families.flux2 import load_pipeline

    pipe = load_pipeline(str(tiny_flux2), torch.float32)
    cond = base_policy.encode(PROMPTS[:2])
    x = torch.randn(2, *base_policy.latent_shape, generator=gen)
    n = 3
    grid, z = base_policy.time_grid(n), x.clone()
    with torch.no_grad():
        for i in range(n):
            v = base_policy.velocity(z, torch.full((2,), float(grid[i])), cond, adapter=None)
            z = z + (float(grid[i + 1]) - float(grid[i])) * v
    side = base_policy.latent_shape[1] * 2 * pipe.vae_scale_factor
    images = pipe(prompt_embeds=cond.embeds, latents=x, height=side, width=side, num_inference_steps=n,
                  output_type="pt").images
    torch.testing.assert_close(base_policy.decode(z), images, **tol(torch.float32))
    assert images.std() > 0.01


def test_packing_and_position_ids_are_the_pipelines(gen):
    from diffusers import Flux2KleinPipeline as P

    x = torch.randn(2, 8, 3, 5, generator=gen)
    torch.testing.assert_close(pack(x), P._pack_latents(x))
    torch.testing.assert_close(unpack(pack(x), 3, 5), x)
    torch.testing.assert_close(latent_ids(3, 5, "cpu"), P._prepare_latent_ids(x)[0].float())
    torch.testing.assert_close(text_ids(7, "cpu"), P._prepare_text_ids(torch.zeros(1, 7, 4))[0].float())
    z = torch.randn(2, 8, 3, 5, generator=gen)
    torch.testing.assert_close(unpatchify(z), P._unpatchify_latents(z))


def _flux2_policy(gen) -> FlowPolicy:
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "num_single_layers": 2}).requires_grad_(False)
    add_distinct_adapters(model, LORA_TARGETS, gen)
    return FlowPolicy(model, encode=None, decode=None, latent_shape=(16, 4, 4), device=torch.device("cpu"),
                      call=flux2_call)


def test_shared_batch_equals_three_calls(gen):
    policy = _flux2_policy(gen)
    x, t = torch.randn(3, 16, 4, 4, generator=gen), torch.rand(3, generator=gen)
    cond = Conditioning(torch.randn(3, 5, TINY_TRANSFORMER["joint_attention_dim"], generator=gen), torch.zeros(3, 0))
    results = both_ways(policy, x, t, cond, torch.randn(x.shape, generator=gen))
    assert_same_both_ways(results)
    a, a_ref, a_ema, a_grads = results[0]
    assert all(g is not None for g in a_grads)
    assert not torch.allclose(a_ref, a_ema, atol=1e-4) and not torch.allclose(a, a_ref, atol=1e-4)


@pytest.mark.parametrize("latent,text_len,guidance", [((16, 4, 4), 6, False), ((16, 2, 6), 3, True)])
def test_forward_flops_match_flop_counter(gen, latent, text_len, guidance):
    config = {**TINY_TRANSFORMER, "num_single_layers": 2, "guidance_embeds": guidance}
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**config).eval()
    x = torch.randn(1, *latent, generator=gen)
    cond = Conditioning(torch.randn(1, text_len, config["joint_attention_dim"], generator=gen), torch.zeros(1, 0))
    counter = FlopCounterMode(display=False)
    # diffusers' native attention (a loaded policy leaves its backend active) on torch's math kernel: matmuls,
    # which FlopCounterMode counts
    with torch.no_grad(), attention_backend("native"), sdpa_kernel(SDPBackend.MATH), counter:
        model(hidden_states=pack(x), encoder_hidden_states=cond.embeds, timestep=torch.rand(1, generator=gen),
              img_ids=latent_ids(*latent[1:], "cpu"), txt_ids=text_ids(text_len, "cpu"),
              guidance=torch.full((1,), 4.0) if guidance else None, return_dict=False)
    assert counter.get_total_flops() == forward_flops(config, latent, text_len)


def test_reference_configs_build_and_memory_estimate():
    """The published 4B / 9B shapes: 3.88 B / 9.08 B transformer parameters; LoRA on 80 / 112 modules."""
    with torch.device("meta"):
        small, large = Flux2Transformer2DModel(**REFERENCE_CONFIG), Flux2Transformer2DModel(**REFERENCE_CONFIG_9B)
    assert 3.8e9 < sum(p.numel() for p in small.parameters()) < 4.0e9
    assert 9.0e9 < sum(p.numel() for p in large.parameters()) < 9.2e9
    modules = [n for n, m in small.named_modules() if isinstance(m, torch.nn.Linear)
               and any(n == t or n.endswith("." + t) for t in LORA_TARGETS)]
    assert len(modules) == 5 * 8 + 20 * 2
    assert lora_parameter_count(small, LORA_TARGETS, 1) == sum(
        small.get_submodule(n).in_features + small.get_submodule(n).out_features for n in modules)
    est = training_memory_estimate(REFERENCE_CONFIG, (128, 32, 32), 512, rows=6)
    assert est["weights_bytes"] == 2 * est["params"] and 12 * 2**30 < est["total_bytes"] < 16 * 2**30


def test_preset_validates():
    cfg = load_config("geneval_flux2_klein")
    assert cfg.model.kind == "flux2" and cfg.model.lora_targets == LORA_TARGETS
    assert cfg.sample.num_steps == 4 and cfg.sample.guidance_scale == 1.0 and cfg.model.text_tokens == 512


def test_distilled_model_refuses_cfg(tmp_path, tiny_flux2, monkeypatch):
    from awm_fast.families.load import load_policy

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="step-distilled") as info:
        load_policy(_cfg(tmp_path, tiny_flux2, "sample.guidance_scale=4.0"), torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_base_model_cfg_rollout_equals_the_pipelines(tmp_path, monkeypatch, gen):
    """A klein base model (is_distilled false): true CFG with the empty prompt, v = v_u + w (v_c - v_u), as
    Flux2KleinPipeline(guidance_scale=w) runs it."""
    from awm_fast.families.flux2 import load_pipeline
    from awm_fast.families.load import load_policy
    from awm_fast.models.policy import GuidedVelocity

    path = build_tiny_flux2(tmp_path / "base", seed=1, is_distilled=False)
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    policy = load_policy(_cfg(tmp_path, path, "sample.guidance_scale=4.0"), torch.device("cpu"), prompts=PROMPTS)
    cond, null = policy.encode(PROMPTS[1:]), policy.encode([""])
    velocity = GuidedVelocity(policy, cond, 4.0, null)
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    n = 2
    grid, z = policy.time_grid(n), x.clone()
    with torch.no_grad():
        for i in range(n):
            v_c, v_u = velocity(z, float(grid[i]), adapter=None)
            z = z + (float(grid[i + 1]) - float(grid[i])) * (v_u + 4.0 * (v_c - v_u))
    pipe = load_pipeline(str(path), torch.float32)
    side = policy.latent_shape[1] * 2 * pipe.vae_scale_factor
    images = pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=null.embeds.repeat(2, 1, 1), latents=x,
                  height=side, width=side, num_inference_steps=n, guidance_scale=4.0, output_type="pt").images
    torch.testing.assert_close(policy.decode(z), images, **tol(torch.float32))
