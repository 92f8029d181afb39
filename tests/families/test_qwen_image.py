"""The Qwen-Image family on a tiny random-weight QwenImagePipeline built and saved locally."""
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from awm_fast.config import load_config
from awm_fast.families.flux import pack, unpack
from awm_fast.families.qwen_image import (forward_flops, load_pipeline, qwen_image_call, set_qwen_attention,
                                          training_memory_estimate)
from awm_fast.families.tiny.qwen_image import build_tiny_qwen_image
from awm_fast.models.policy import Conditioning, FlowPolicy, GuidedVelocity
from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
from awm_fast.train.trainer import train
from tests.models.shared_batch_check import assert_same_both_ways, both_ways
from tests.models.tiny_configs import (add_distinct_adapters, assert_stock_pipeline_reproduces,
                                       base_policy_at, tiny_model_config)
from tests.tolerances import tol

PROMPTS = ["a red cube", "two green balls on a wooden table", "a cat"]  # different token lengths


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image") / "pipe")


@pytest.fixture(scope="module")
def pipe(tiny_qwen):
    return load_pipeline(str(tiny_qwen), torch.float32)


@pytest.fixture(scope="module")
def policy(tiny_qwen, tmp_path_factory):
    """The family's policy (base model: fresh LoRA, B = 0) with every test prompt encoded."""
    tmp = tmp_path_factory.mktemp("qwen_policy")
    return base_policy_at(tmp, _cfg(tmp, tiny_qwen), PROMPTS)


def _cfg(tmp_path, model_path, *extra):
    return tiny_model_config(tmp_path, "qwen_image", model_path, PROMPTS, "model.text_tokens=64", *extra)


def test_prompt_embeddings_are_the_pipelines_without_the_template_prefix(policy, pipe):
    cond = policy.encode(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and cond.embeds.shape[1] % 32 == 0 and cond.pooled.shape == (3, 0)
    torch.testing.assert_close(cond.mask.sum(1), lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(cond.embeds[i, :n], embeds[i, :n])
        assert not cond.embeds[i, n:].any()
    # the kept tokens are the prompt and the assistant suffix: 34 template tokens dropped
    template = pipe.prompt_template_encode
    ids = pipe.tokenizer([template.format(p) for p in PROMPTS], padding=True).attention_mask
    assert [sum(m) - 34 for m in ids] == lengths.tolist()


def test_policy_grid_is_the_pipelines_scheduler_grid(policy, pipe):
    """QwenImagePipeline's sigmas: exponential shift with mu from the packed sequence length, stretched so the
    last non-zero sigma is shift_terminal; also against the float64 formula."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = pipe.scheduler.config
    seq = (policy.latent_shape[-1] // 2) ** 2
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    for n in (2, 4, 14, 50):
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # as the pipeline calls it
        grid = policy.time_grid(n)
        torch.testing.assert_close(grid, pipe.scheduler.sigmas.double(), atol=0, rtol=0)
        u = torch.linspace(1, 1 / n, n, dtype=torch.float64)
        s = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        s = 1 - (1 - s) * (1 - c.shift_terminal) / (1 - s[-1])
        torch.testing.assert_close(grid[:-1], s, atol=1e-6, rtol=0)
        assert grid[-2] == pytest.approx(c.shift_terminal, abs=1e-7) and grid[-1] == 0


def _renormed(v_cond, v_uncond, w):
    """The pipeline's true CFG on (B, C, H, W): guided prediction rescaled per packed token to the cond norm."""
    guided = pack(v_uncond + w * (v_cond - v_uncond))
    scale = pack(v_cond).norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
    return unpack(guided * scale, *v_cond.shape[-2:])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_euler_steps_match_the_pipelines_denoising(policy, pipe, gen, cfg_scale):
    """The pipeline's own loop (packed latents, timestep / 1000, its scheduler) against Euler steps on the
    policy's grid and velocity; with true CFG (negative prompt "") after the pipeline's norm rescaling, which
    our GuidedVelocity does not do. The decoded image is the pipeline's output_type="pt" image."""
    prompt, n = ["two green balls on a wooden table", "a cat"], 3
    cond, null = policy.encode(prompt), policy.encode([""])
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    kw = dict(prompt_embeds=cond.embeds, prompt_embeds_mask=cond.mask, latents=pack(x), height=16, width=16,
              num_inference_steps=n, true_cfg_scale=cfg_scale)
    if cfg_scale != 1.0:
        kw.update(negative_prompt_embeds=null.embeds.expand(2, -1, -1),
                  negative_prompt_embeds_mask=null.mask.expand(2, -1))
    theirs = unpack(pipe(**kw, output_type="latent").images, 8, 8)
    image = pipe(**kw, output_type="pt").images
    guided = GuidedVelocity(policy, cond, cfg_scale, null)
    grid, ours, plain = policy.time_grid(n), x.clone(), x.clone()
    with torch.no_grad():
        for i in range(n):
            dt = float(grid[i + 1] - grid[i])
            v, u = guided(ours, float(grid[i]), adapter=None)
            ours = ours + dt * (v if u is None else _renormed(v, u, cfg_scale))
            v, u = guided(plain, float(grid[i]), adapter=None)
            plain = plain + dt * (v if u is None else u + cfg_scale * (v - u))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy.decode(ours), image, atol=1e-5, rtol=1e-5)
    assert image.shape == (2, 3, 16, 16)
    if cfg_scale != 1.0:
        assert not torch.allclose(plain, theirs, atol=1e-4)


def test_padding_the_text_changes_nothing(policy, gen):
    cond = policy.encode(["a cat"])
    n = int(cond.mask.sum())
    short = Conditioning(cond.embeds[:, :n], cond.pooled, None)
    x, t = torch.randn(1, *policy.latent_shape, generator=gen), torch.rand(1, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, t, cond), policy.velocity(x, t, short), atol=1e-6, rtol=1e-6)


def test_every_trainable_lora_weight_gets_a_gradient(policy, gen):
    """What DDP needs: the last block's discarded text-output LoRA (to_add_out's A and B) is not trainable."""
    params = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n and ".default." in n for n in params)
    frozen = [n for n, p in policy.transformer.named_parameters() if ".default." in n and not p.requires_grad]
    assert frozen == [f"transformer_blocks.1.attn.to_add_out.lora_{m}.default.weight" for m in "AB"]
    x, t = torch.randn(3, *policy.latent_shape, generator=gen), torch.rand(3, generator=gen)
    policy.velocity(x, t, policy.encode(PROMPTS)).square().sum().backward()
    assert all(p.grad is not None for p in params.values())
    for p in params.values():
        p.grad = None


def test_trainer_runs_on_tiny_qwen_image_and_exports_loadable_lora(tmp_path, tiny_qwen, monkeypatch):
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_qwen, "train.lr=0.05", "train.shared_batch=true", "train.gradient_checkpointing=true")
    summary = json.loads(train(cfg).read_text())
    assert summary["steps"] == 2 and "jpeg_kb" in summary["eval_after"]
    rows = [json.loads(x) for x in (tmp_path / "qwen_image" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)

    from awm_fast.families.load import load_policy

    trained = load_policy(_cfg(tmp_path, tiny_qwen), torch.device("cpu"), prompts=PROMPTS)
    load_checkpoint(resolve_checkpoint(tmp_path / "qwen_image"), trained.transformer)
    x, t, cond = torch.full((2, 4, 8, 8), 0.3), torch.tensor([0.6, 0.3]), trained.encode(PROMPTS[1:])
    ours = trained.velocity(x, t, cond).detach()
    assert_stock_pipeline_reproduces(load_pipeline(str(tiny_qwen), torch.float32), tmp_path / "qwen_image",
                                     qwen_image_call, ours, x, t, cond)


@pytest.fixture
def lora_policy(pipe, gen):
    """The tiny transformer with distinct non-zero "default" and "ema" LoRA deltas, called as the family does."""
    import copy

    model = copy.deepcopy(pipe.transformer).requires_grad_(False)
    set_qwen_attention(model, "sdpa_math")
    add_distinct_adapters(model, ["attn.to_q", "attn.to_v", "attn.to_add_out"], gen)
    return FlowPolicy(model, encode=None, decode=None, latent_shape=(4, 8, 8), device=torch.device("cpu"),
                      call=qwen_image_call)


def test_shared_batch_equals_three_calls(lora_policy, gen):
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.rand(3, generator=gen)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 3:], mask[2, 5:] = False, False
    cond = Conditioning(torch.randn(3, 6, 32, generator=gen), torch.zeros(3, 0), mask)
    # the last block's text-stream output is discarded: its to_add_out LoRA gets no gradient
    results = both_ways(lora_policy, x, t, cond, torch.randn(x.shape, generator=gen))
    assert_same_both_ways(results)
    assert not torch.allclose(results[0][0], results[0][1], atol=1e-4)  # the LoRA delta is visible
    assert sum(g is None for g in results[0][3]) == 2  # lora_A and lora_B of the last block's to_add_out


def test_compiled_blocks_equal_eager_with_the_token_mask(lora_policy, gen):
    """Regional compile (fullgraph) of the Qwen-Image block with the prompts' mask; a second batch size reuses
    the graph (the batch dimension of every block input, the mask included, is dynamic). Not in the trainer run:
    a run traces ~7 variants of the block (text lengths, routing descriptors, grad modes), 5-10 s each here."""
    from torch._dynamo.utils import counters

    from awm_fast.models.compile import compile_blocks, uncompile_blocks

    def rows(b):
        mask = torch.ones(b, 32, dtype=torch.bool)
        mask[0, 5:] = False
        return (torch.randn(b, 4, 8, 8, generator=gen), torch.rand(b, generator=gen),
                Conditioning(torch.randn(b, 32, 32, generator=gen), torch.zeros(b, 0), mask))

    batches = [rows(3), rows(5)]
    with torch.no_grad():
        eager = [lora_policy.velocity(*b) for b in batches]
        graphs = counters["stats"]["unique_graphs"]
        compile_blocks(lora_policy.transformer, backend="eager")
        try:
            compiled = [lora_policy.velocity(*b) for b in batches]
        finally:
            uncompile_blocks(lora_policy.transformer)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, **tol(torch.float32))


def test_forward_flops_match_flop_counter(pipe, gen):
    config, text_len = dict(pipe.transformer.config), 7
    x, t = torch.randn(3, 4, 8, 12, generator=gen), torch.rand(3, generator=gen)
    cond = Conditioning(torch.randn(3, text_len, 32, generator=gen), torch.zeros(3, 0),
                        torch.ones(3, text_len, dtype=torch.bool))
    pipe.transformer.set_attention_backend("_native_math")  # attention as matmuls, which FlopCounterMode counts
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        qwen_image_call(pipe.transformer, x, t, cond)
    assert counter.get_total_flops() == 3 * forward_flops(config, (4, 8, 12), text_len)
    with pytest.raises(ValueError, match="even H and W"):
        forward_flops(config, (4, 7, 8), text_len)


def test_reference_memory_estimate_needs_an_80gb_gpu():
    est = training_memory_estimate()
    assert est.params == 20_430_401_088  # Qwen/Qwen-Image's transformer
    assert 48e9 < est.total < 80e9 and est.weights > 40e9
    assert training_memory_estimate(checkpointing=False).total > 140e9


def test_flash_backends_are_refused_in_one_line():
    for backend in ("flash2", "flash3", "sdpa_flash", "xformers"):
        with pytest.raises(ValueError, match="attention mask in diffusers") as info:
            set_qwen_attention(None, backend)
        assert "\n" not in str(info.value)


def test_preset_validates():
    cfg = load_config("geneval_qwen_image", [])
    assert cfg.model.kind == "qwen_image" and cfg.train.gradient_checkpointing and cfg.sample.guidance_scale == 1.0
