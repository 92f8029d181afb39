"""The Z-Image family on a tiny random-weight ZImagePipeline built and saved locally: training end to end, the LoRA
through ZImagePipeline.load_lora_weights, the scheduler grid, the velocity convention against the pipeline's own
denoising loop, the FLOP formula, the shared batch with prompts of different lengths."""
import json

import pytest
import torch

from awm_fast.families.tiny.z_image import TINY_TRANSFORMER, build_tiny_z_image
from awm_fast.families.z_image import (LORA_TARGETS, REFERENCE_CONFIG, caption_list, forward_flops, load_pipeline,
                                       padded_conditioning, set_z_image_attention, training_memory, z_image_call)
from awm_fast.models.lora import EMA, POLICY
from awm_fast.models.policy import FlowPolicy, GuidedVelocity
from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
from awm_fast.train.trainer import train
from tests.models.shared_batch_check import assert_same_both_ways, both_ways, compiled_check_outputs
from tests.models.tiny_configs import add_distinct_adapters, assert_stock_pipeline_reproduces, tiny_model_config
from tests.tolerances import tol

# caption lengths (chat template included: 19 tokens + one per byte) 29, 34 and 84: padded to 32, 64 and 96 inside
# the transformer, so a batch of two of them carries an attention mask
PROMPTS = ["a red cube", "two green balls", "a photo of a purple dog sitting on a wooden bench in a sunny park"]


@pytest.fixture(scope="module")
def tiny_z(tmp_path_factory):
    return build_tiny_z_image(tmp_path_factory.mktemp("tiny_z_image") / "pipe")


def _cfg(tmp_path, model_path, *extra):
    targets = "model.lora_targets=[" + ",".join(LORA_TARGETS) + "]"
    # one thread: the tiny matmuls run ~50x slower on 2 threads when the machine's cores are busy
    return tiny_model_config(tmp_path, "z_image", model_path, PROMPTS, targets, "run.threads=1", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_z):
    """A 2-step run with the shared batch and gradient checkpointing (the compiled blocks: the compile test below,
    whose 13 dynamo captures of the block variants took 30 s more inside a run); returns the run's tmp folder."""
    tmp = tmp_path_factory.mktemp("z_image_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWM_FAST_CACHE", str(tmp / "cache"))
        cfg = _cfg(tmp, tiny_z, "train.lr=0.05", "train.shared_batch=true", "train.gradient_checkpointing=true")
        summary = json.loads(train(cfg).read_text())
    return tmp, summary


def test_trainer_runs_two_steps_on_tiny_z_image(trained):
    tmp, summary = trained
    assert summary["steps"] == 2 and "jpeg_kb" in summary["eval_after"]
    rows = [json.loads(x) for x in (tmp / "z_image" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)


def test_lora_loads_into_z_image_pipeline_and_reproduces_the_policy(trained, tiny_z, monkeypatch, gen):
    from awm_fast.families.load import load_policy

    tmp, _ = trained
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp / "cache"))
    policy = load_policy(_cfg(tmp, tiny_z), torch.device("cpu"), prompts=PROMPTS)
    load_checkpoint(resolve_checkpoint(tmp / "z_image"), policy.transformer)
    x, t, cond = torch.randn(3, 16, 8, 8, generator=gen), torch.tensor([0.9, 0.6, 0.2]), policy.encode(PROMPTS)
    assert cond.mask is not None and not cond.mask.all()  # padded: the prompts have different lengths
    with torch.no_grad():
        ours = policy.velocity(x, t, cond)
    assert_stock_pipeline_reproduces(load_pipeline(str(tiny_z), torch.float32), tmp / "z_image", z_image_call, ours,
                                     x, t, cond)


def test_policy_grid_and_velocity_follow_the_z_image_pipeline(tmp_path, tiny_z, monkeypatch, gen):
    """The grid: the scheduler's sigmas as ZImagePipeline sets them. The velocity: our Euler steps on that grid,
    x <- x + (sigma' - sigma) v(x, sigma), reproduce the pipeline's own denoising (its timestep (1000 - t) / 1000
    and negated prediction), without CFG (guidance 0, as Z-Image-Turbo) and with it."""
    from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                              retrieve_timesteps)

    from awm_fast.sampling.timesteps import shift_time
    from awm_fast.families.load import load_policy

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    policy = load_policy(_cfg(tmp_path, tiny_z), torch.device("cpu"), prompts=PROMPTS)
    pipe = load_pipeline(str(tiny_z), torch.float32)
    side = policy.latent_shape[-1]
    assert policy.latent_shape == (16, 8, 8)
    for n in (2, 8, 9, 28):
        retrieve_timesteps(pipe.scheduler, n, "cpu", sigmas=get_default_z_image_sigmas(n),
                           mu=calculate_shift((side // 2) ** 2))
        torch.testing.assert_close(policy.time_grid(n), pipe.scheduler.sigmas.double(), atol=0, rtol=0)
        u = torch.linspace(1, 1 / n, n, dtype=torch.float64)
        torch.testing.assert_close(policy.time_grid(n)[:-1], shift_time(u, 3.0), atol=1e-6, rtol=0)  # float32 there
    x0 = torch.randn(2, 16, 8, 8, generator=gen)
    grid, cond = policy.time_grid(2), policy.encode(PROMPTS[1:])
    # the pipeline's CFG pos + w (pos - neg) with the "" negative is ours, v_u + w' (v_c - v_u), at w' = w + 1
    for pipe_scale in (0.0, 2.5):
        out = pipe(PROMPTS[1:], height=16, width=16, num_inference_steps=2, guidance_scale=pipe_scale,
                   latents=x0.clone(), output_type="latent", max_sequence_length=128).images
        guided, x = GuidedVelocity(policy, cond, pipe_scale + 1, null_cond=policy.encode([""])), x0
        with torch.no_grad():
            for i in range(2):
                v_c, v_u = guided(x, float(grid[i]), adapter=None)
                v = v_c if v_u is None else v_u + (pipe_scale + 1) * (v_c - v_u)
                x = x + float(grid[i + 1] - grid[i]) * v
        torch.testing.assert_close(x, out, atol=1e-5, rtol=1e-5)


def test_forward_flops_match_the_flop_counter_on_the_tiny_transformer(gen):
    from diffusers import ZImageTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**TINY_TRANSFORMER).eval()
    set_z_image_attention(model, "sdpa_math")
    for h, w, text_len in ((8, 8, 5), (16, 12, 40), (4, 6, 32)):
        x = torch.randn(1, 16, h, w, generator=gen)
        cond = padded_conditioning([torch.randn(text_len, TINY_TRANSFORMER["cap_feat_dim"], generator=gen)])
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            z_image_call(model, x, torch.tensor([0.3]), cond)
        assert counter.get_total_flops() == forward_flops(TINY_TRANSFORMER, (16, h, w), text_len) > 0
    with pytest.raises(ValueError, match="divisible by patch"):
        forward_flops(TINY_TRANSFORMER, (16, 7, 8), 8)
    # Z-Image-Turbo at 512 px: 1024 image tokens; 512 caption tokens (the preset's text_tokens) or 64
    assert round(forward_flops(REFERENCE_CONFIG, (16, 64, 64), 512) / 1e12, 1) == 18.5
    assert round(forward_flops(REFERENCE_CONFIG, (16, 64, 64), 50) / 1e12, 1) == 12.9


def test_memory_estimate_of_z_image_turbo():
    est = training_memory()
    assert round(est.params / 1e9, 2) == 6.15  # "6B"
    assert est.lora_params == 34 * 4 * 2 * 3840 * 32  # 30 + 2 + 2 blocks x q/k/v/out, (3840 + 3840) x r 32
    assert 24 * 2**30 < est.peak < 40 * 2**30  # ~30.6 GiB: an 80 GB GPU; 40/48 GB ones likely, untested


def _tiny_policy(gen, checkpointing=False) -> FlowPolicy:
    from diffusers import ZImageTransformer2DModel

    from awm_fast.models.routing import enable_checkpointing

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**TINY_TRANSFORMER).requires_grad_(False)
    add_distinct_adapters(model, list(LORA_TARGETS), gen)
    if checkpointing:
        enable_checkpointing(model)
    return FlowPolicy(model, encode=None, decode=None, latent_shape=(16, 8, 8), device=torch.device("cpu"),
                      call=z_image_call)


def _rows(gen, lengths=(5, 40, 12, 33)):
    captions = [torch.randn(n, TINY_TRANSFORMER["cap_feat_dim"], generator=gen) for n in lengths]
    return torch.randn(len(lengths), 16, 8, 8, generator=gen), torch.rand(len(lengths), generator=gen), \
        padded_conditioning(captions), captions


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_batch_equals_three_calls_with_prompts_of_different_lengths(gen, checkpointing):
    policy = _tiny_policy(gen, checkpointing)
    x, t, cond, _ = _rows(gen)
    results = both_ways(policy, x, t, cond, torch.randn(x.shape, generator=gen))
    assert_same_both_ways(results)
    a, a_ref, a_ema, a_grads = results[0]
    assert all(g is not None for g in a_grads)
    assert not torch.allclose(a_ref, a_ema, atol=1e-4) and not torch.allclose(a, a_ref, atol=1e-4)


def test_each_row_is_its_own_sample_after_the_transformers_padding(gen):
    """Row b of a padded batch (the captions' mask, the transformer's own padding to the longest sequence) equals
    the sample alone, for each adapter: batch rows stay rows, which the per-row LoRA routing relies on."""
    policy = _tiny_policy(gen)
    x, t, cond, captions = _rows(gen)
    assert [c.shape[0] for c in caption_list(cond)] == [c.shape[0] for c in captions]
    with torch.no_grad():
        for adapter in (POLICY, None, EMA):
            batch = policy.velocity(x, t, cond, adapter)
            for b, caption in enumerate(captions):
                alone = policy.velocity(x[b:b + 1], t[b:b + 1], padded_conditioning([caption]), adapter)
                torch.testing.assert_close(batch[b:b + 1], alone, **tol(torch.float32))


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_do_not_recompile_for_other_caption_lengths(gen):
    """Regional compile of the refiners and main layers (fullgraph, eager backend): equal to eager; a batch of
    another size whose captions pad to other lengths reuses the graphs (batch and token dims dynamic)."""
    from awm_fast.models.compile import compile_blocks, uncompile_blocks

    policy = _tiny_policy(gen)
    x, t, cond, _ = _rows(gen)
    eager = compiled_check_outputs(policy, x, t, cond)
    assert compile_blocks(policy.transformer, backend="eager") == 4  # 1 + 1 refiners, 2 layers
    try:
        for a, b in zip(eager, compiled_check_outputs(policy, x, t, cond)):
            torch.testing.assert_close(b, a, **tol(torch.float32))
        x2, t2, cond2, _ = _rows(gen, lengths=(70, 3, 50))
        expected = compiled_check_outputs(policy, x2, t2, cond2)
        with torch.compiler.set_stance("fail_on_recompile"):
            assert len(compiled_check_outputs(policy, x2, t2, cond2)) == len(expected)
    finally:
        uncompile_blocks(policy.transformer)


def test_attention_backends_without_a_mask_are_one_clear_line():
    for backend in ("flash3", "sdpa_flash"):
        with pytest.raises(ValueError, match="takes no attention mask") as info:
            set_z_image_attention(None, backend)
        assert "\n" not in str(info.value)


def test_lora_targets_that_match_no_module_are_one_clear_line():
    from diffusers import ZImageTransformer2DModel

    from awm_fast.config import SD3_LORA_TARGETS
    from awm_fast.families.z_image import check_lora_targets

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    check_lora_targets(model, LORA_TARGETS)
    check_lora_targets(model, ["to_q", "feed_forward.w1"])
    with pytest.raises(ValueError, match="attention.to_q,attention.to_k") as info:
        check_lora_targets(model, SD3_LORA_TARGETS)
    assert "\n" not in str(info.value) and "attn.add_q_proj" in str(info.value)


def test_z_image_preset_validates():
    from awm_fast.config import load_config

    cfg = load_config("geneval_z_image")
    assert (cfg.model.kind, cfg.model.path, cfg.model.text_tokens) == ("z_image", "Tongyi-MAI/Z-Image-Turbo", 512)
    assert cfg.model.lora_targets == list(LORA_TARGETS) and cfg.sample.guidance_scale == 1.0
    assert cfg.train.gradient_checkpointing and cfg.sample.cuda_graphs is not True  # false or auto
    from awm_fast.families import fast_path

    assert fast_path(cfg, "cuda").cuda_graphs is False  # auto leaves the graphs off for Z-Image, also on CUDA
