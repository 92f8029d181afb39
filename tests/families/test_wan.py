"""The Wan family on a tiny random-weight WanPipeline built and saved locally: training end to end on video
latents (CFG, shared batch, compiled and checkpointed blocks), the LoRA through WanPipeline.load_lora_weights, the
UniPC grid, the velocity / CFG / decode conventions against the pipeline itself, the FLOP formula, the shared
batch; the ops on 5-D latents."""
import json

import pytest
import torch

from awm_fast.families.tiny.wan import build_tiny_wan, tiny_wan_transformer_config
from awm_fast.families.wan import (LORA_TARGETS, REFERENCE_CONFIG, check_single_transformer, forward_flops,
                                   keep_fp32_modules, latent_frames, load_pipeline, training_memory, wan_call)
from awm_fast.models.policy import FlowPolicy, GuidedVelocity
from awm_fast.ops import awm_loss, sde_step
from awm_fast.sampling.timesteps import shift_time
from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
from awm_fast.train.trainer import train
from tests.models.shared_batch_check import assert_same_both_ways, both_ways
from tests.models.tiny_configs import (add_distinct_adapters, assert_stock_pipeline_reproduces,
                                       base_policy_at, tiny_model_config)
from tests.tolerances import tol

PROMPTS = ["a red cube", "two green balls", "a cat"]
FRAMES, RESOLUTION, TEXT_TOKENS = 5, 32, 16  # latents (16, 2, 4, 4): 2 x 2 x 2 = 8 video tokens


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan") / "pipe")


def _cfg(tmp_path, model_path, *extra):
    targets = "model.lora_targets=[" + ",".join(LORA_TARGETS) + "]"
    return tiny_model_config(tmp_path, "wan", model_path, PROMPTS, targets, f"model.frames={FRAMES}",
                             f"model.resolution={RESOLUTION}", f"model.text_tokens={TEXT_TOKENS}", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_wan):
    """A 2-step run with CFG 5 (rollout and evaluation), the shared batch, compiled blocks (eager backend: dynamo's
    capture of every block) and gradient checkpointing (no EMA evaluation, 2-step evaluations: the VAE decodes are
    the run's largest cost on CPU); returns the run's tmp folder and summary."""
    tmp = tmp_path_factory.mktemp("wan_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWM_FAST_CACHE", str(tmp / "cache"))
        cfg = _cfg(tmp, tiny_wan, "train.lr=0.05", "train.shared_batch=true", "model.compile=true",
                   "model.compile_backend=eager", "train.gradient_checkpointing=true", "sample.guidance_scale=5.0",
                   "sample.eval_guidance_scale=5.0", "train.eval_ema=false", "sample.eval_num_steps=2")
        summary = json.loads(train(cfg).read_text())
    return tmp, summary


def _policy(tmp, tiny_wan, monkeypatch):
    from awm_fast.families.load import load_policy

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp / "cache"))
    return load_policy(_cfg(tmp, tiny_wan), torch.device("cpu"), prompts=PROMPTS)


@pytest.mark.slow
def test_trainer_runs_two_steps_on_tiny_wan_videos(trained):
    tmp, summary = trained
    assert summary["steps"] == 2 and {"jpeg_kb", "frame_std"} <= set(summary["eval_after"])
    rows = [json.loads(x) for x in (tmp / "wan" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)
    assert all(r["frame_std"] > 0 for r in rows)  # the per-frame reward spread, logged as a reward part
    for when in ("step_000000_raw", "step_000002_raw"):  # the evaluation's GIFs and frames of the first videos
        folder = tmp / "wan" / "previews" / when
        assert sorted(p.name for p in folder.iterdir()) == ["0000.gif", "0000_frames.png", "0001.gif",
                                                              "0001_frames.png", "previews.json"]


@pytest.mark.slow
def test_lora_loads_into_wan_pipeline_and_reproduces_the_policy(trained, tiny_wan, monkeypatch, gen):
    tmp, _ = trained
    policy = _policy(tmp, tiny_wan, monkeypatch)
    assert policy.latent_shape == (16, 2, 4, 4)
    load_checkpoint(resolve_checkpoint(tmp / "wan"), policy.transformer)
    x, t = torch.randn(2, *policy.latent_shape, generator=gen), torch.tensor([0.6, 0.3])
    cond = policy.encode(PROMPTS[:2])
    ours = policy.velocity(x, t, cond).detach()
    assert_stock_pipeline_reproduces(load_pipeline(str(tiny_wan), torch.float32), tmp / "wan", policy.call, ours,
                                     x, t, cond)


@pytest.fixture(scope="module")
def base_policy(tmp_path_factory, tiny_wan):
    tmp = tmp_path_factory.mktemp("wan_base")
    return base_policy_at(tmp, _cfg(tmp, tiny_wan), PROMPTS)


def test_grid_is_the_unipc_flow_sigmas_as_the_pipeline_sets_them(base_policy, tiny_wan):
    pipe = load_pipeline(str(tiny_wan), torch.float32)
    for n in (4, 14, 50):
        pipe.scheduler.set_timesteps(n)  # as WanPipeline calls it
        grid, theirs = base_policy.time_grid(n), pipe.scheduler.sigmas.double()
        torch.testing.assert_close(grid[1:], theirs[1:], atol=0, rtol=0)
        assert grid[0] == 1 and 0 < 1 - theirs[0] < 2e-6  # UniPC's 1 - 1e-6, read as 1
        closed = shift_time(torch.linspace(1, 1 / 1000, n + 1, dtype=torch.float64)[:-1], 3.0)
        torch.testing.assert_close(grid[1:-1], closed[1:], atol=1e-6, rtol=0)


def test_velocity_cfg_and_decode_follow_one_pipeline_step(base_policy, tiny_wan, gen):
    """WanPipeline, 1 UniPC step (sigma 1 - 1e-6 -> 0 at integer timestep 999): x0 = x - sigma v with v the
    (guided) transformer output; ours: the same with policy.call at t = 0.999 and the empty prompt as the
    unconditional; then the frames decoded from x0 equal the pipeline's output_type="pt" frames."""
    policy = base_policy
    pipe = load_pipeline(str(tiny_wan), torch.float32)
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    pipe.scheduler.set_timesteps(1)
    sigma = float(pipe.scheduler.sigmas[0])
    kw = dict(prompt=PROMPTS[:2], height=RESOLUTION, width=RESOLUTION, num_frames=FRAMES, num_inference_steps=1,
              max_sequence_length=TEXT_TOKENS, latents=x.clone())
    cond, null = policy.encode(PROMPTS[:2]), policy.encode([""])
    t = torch.full((2,), 0.999)
    with torch.no_grad():
        for scale in (1.0, 5.0):
            theirs = pipe(**kw, guidance_scale=scale, output_type="latent").frames
            v, v_uncond = GuidedVelocity(policy, cond, scale, null)(x, t)
            if v_uncond is not None:
                v = v_uncond + scale * (v - v_uncond)
            torch.testing.assert_close(x - sigma * v, theirs, atol=1e-5, rtol=1e-5)
        frames = pipe(**kw, guidance_scale=1.0, output_type="pt").frames
    ours = policy.decode(x - sigma * policy.velocity(x, t, cond))
    assert ours.shape == (2, FRAMES, 3, RESOLUTION, RESOLUTION) and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, frames.float(), atol=1e-5, rtol=1e-5)


def test_two_expert_pipelines_and_bad_frames_are_refused(tiny_wan):
    index = json.loads((tiny_wan / "model_index.json").read_text())
    check_single_transformer(index)  # the tiny Wan 2.1 pipeline: transformer_2 [null, null], no boundary
    assert index["transformer_2"] == [None, None]
    a14b = {**index, "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
    with pytest.raises(ValueError, match="two experts"):
        check_single_transformer(a14b)
    with pytest.raises(ValueError, match="no `transformer`"):
        check_single_transformer({**index, "transformer": [None, None]})
    assert latent_frames(33) == 9 and latent_frames(81) == 21 and latent_frames(1) == 1
    with pytest.raises(ValueError, match="divisible by 4"):
        latent_frames(32)


def _tiny_transformer(gen):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_wan_transformer_config()).requires_grad_(False)


def test_forward_flops_match_the_flop_counter_on_the_tiny_transformer(gen):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from awm_fast.families.wan import set_wan_attention

    model, text_len = _tiny_transformer(gen), 7
    set_wan_attention(model, "sdpa_math")  # the CPU flash kernel is not in the counter's table; math's matmuls are
    for shape in ((16, 2, 4, 4), (16, 3, 6, 2)):
        x, cond = torch.randn(1, *shape, generator=gen), torch.randn(1, text_len, 32, generator=gen)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond, return_dict=False)
        assert counter.get_total_flops() == forward_flops(tiny_wan_transformer_config(), shape, text_len)
    # Wan2.1-T2V-1.3B, 33 frames at 480 x 480, 512 text tokens: 8100 video tokens
    assert forward_flops(REFERENCE_CONFIG, (16, 9, 60, 60), 512) == pytest.approx(33.27e12, rel=1e-3)


def test_memory_estimate_of_wan21_1_3b():
    m = training_memory(REFERENCE_CONFIG, (16, latent_frames(33), 60, 60), 512, rows=2 * 6, lora_rank=32)
    assert m.params == pytest.approx(1.419e9, rel=1e-3)  # Wan2.1-T2V-1.3B
    assert m.weights_gib == pytest.approx(m.params * 2 / 2**30)
    assert 15 < m.total_gib < 30  # the preset's micro-batch 2 x 6 timesteps: fits a 40 GB GPU with the VAE


def test_expanded_timesteps_equal_the_per_sample_timestep(gen):
    """Wan 2.2 TI2V's per-token timesteps (all equal in text-to-video) give the per-sample call's velocity."""
    from awm_fast.models.policy import Conditioning

    model = _tiny_transformer(gen)
    x, t = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.tensor([0.7, 0.2])
    cond = Conditioning(torch.randn(2, 5, 32, generator=gen), torch.zeros(2, 0))
    with torch.no_grad():
        torch.testing.assert_close(wan_call(model, x, t, cond, expand_timesteps=True), wan_call(model, x, t, cond),
                                   **tol(torch.float32))


def test_half_precision_keeps_the_fp32_modules(gen):
    model = _tiny_transformer(gen).to(torch.bfloat16)
    keep_fp32_modules(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_batch_equals_three_calls_on_video_latents(gen, checkpointing):
    from awm_fast.models.policy import Conditioning
    from awm_fast.models.routing import enable_checkpointing

    model = _tiny_transformer(gen)
    add_distinct_adapters(model, LORA_TARGETS, gen)
    if checkpointing:
        enable_checkpointing(model)
    policy = FlowPolicy(model, encode=None, decode=None, latent_shape=(16, 2, 4, 4), device=torch.device("cpu"),
                        call=wan_call)
    x, t = torch.randn(3, 16, 2, 4, 4, generator=gen), torch.rand(3, generator=gen)
    cond = Conditioning(torch.randn(3, 5, 32, generator=gen), torch.zeros(3, 0))
    results = both_ways(policy, x, t, cond)
    assert_same_both_ways(results)
    assert all(g is not None for g in results[0][3])


def test_ops_treat_video_latents_as_rows_of_values(gen):
    """awm_loss and sde_step on (B, C, F, H, W) equal the same values as (B, C F, H, W): rows x values."""
    rows, shape = 4, (4, 3, 2, 5, 6)
    v, target, v_ref, v_ema = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    t, adv = torch.rand(rows, generator=gen, dtype=torch.float64), torch.randn(rows, generator=gen, dtype=torch.float64)
    flat = lambda z: z.reshape(rows, 6, 5, 6)  # noqa: E731
    kw = dict(beta=0.1, ema_beta=0.5, num_timesteps=2, backend="torch")
    five = awm_loss(v, target, t, adv, v_ref=v_ref, v_ema=v_ema, **kw)
    four = awm_loss(flat(v), flat(target), t, adv, v_ref=flat(v_ref), v_ema=flat(v_ema), **kw)
    for a, b in ((five.loss, four.loss), (five.log_prob, four.log_prob), (five.kl, four.kl)):
        torch.testing.assert_close(a, b)
    x, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    step5 = sde_step(x, v.float(), 0.7, 0.5, noise=noise, kind="euler_maruyama", backend="torch")
    step4 = sde_step(flat(x), flat(v.float()), 0.7, 0.5, noise=flat(noise), kind="euler_maruyama", backend="torch")
    torch.testing.assert_close(flat(step5.x_next), step4.x_next)
    torch.testing.assert_close(step5.log_prob, step4.log_prob)


def test_wan_preset_validates():
    from awm_fast.config import load_config

    cfg = load_config("pickscore_wan")
    m, s = cfg.model, cfg.sample
    assert (m.kind, m.frames, m.resolution, m.text_tokens) == ("wan", 33, 480, 512)
    assert m.lora_targets == LORA_TARGETS and s.guidance_scale == s.eval_guidance_scale == 5.0
    assert cfg.reward.name == "pickscore" and cfg.train.gradient_checkpointing
