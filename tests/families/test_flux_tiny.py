"""The real FLUX loading path on a tiny random-weight pipeline built and saved locally."""
import json

import numpy as np

import pytest
import torch

from awm_fast.families.flux import image_ids, load_flux_pipeline, pack, unpack
from awm_fast.families.tiny import build_tiny_flux
from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
from awm_fast.train.trainer import train
from tests.models.tiny_configs import assert_stock_pipeline_reproduces, tiny_model_config


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipe")


def _cfg(tmp_path, model_path, *extra):
    prompts = ["a red cube", "two green balls", "a cat"]
    return tiny_model_config(tmp_path, "flux", model_path, prompts, "model.text_tokens=16", *extra)


def test_pack_unpack_round_trip(gen):
    x = torch.randn(2, 16, 6, 4, generator=gen)
    assert pack(x).shape == (2, 6, 64)
    torch.testing.assert_close(unpack(pack(x), 6, 4), x)
    assert image_ids(6, 4, "cpu", torch.float32).tolist()[:3] == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]


def test_trainer_runs_on_tiny_flux_and_exports_loadable_lora(tmp_path, tiny_flux, monkeypatch):
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_flux, "train.lr=0.05", "train.shared_batch=true", "model.compile=true",
               "model.compile_backend=eager")  # dynamo capture of every block; the SD3 test runs aot_eager
    summary = json.loads(train(cfg).read_text())
    assert summary["steps"] == 2 and "jpeg_kb" in summary["eval_after"]
    rows = [json.loads(x) for x in (tmp_path / "flux" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)

    from awm_fast.families.load import load_policy

    policy = load_policy(_cfg(tmp_path, tiny_flux), torch.device("cpu"), prompts=["a cat"])
    load_checkpoint(resolve_checkpoint(tmp_path / "flux"), policy.transformer)
    x, t, cond = torch.full((1, 16, 8, 8), 0.3), torch.tensor([0.6]), policy.encode(["a cat"])
    ours = policy.velocity(x, t, cond)
    assert_stock_pipeline_reproduces(load_flux_pipeline(str(tiny_flux), torch.float32), tmp_path / "flux", policy.call,
                                     ours, x, t, cond)


def test_flash3_for_flux_training_is_one_clear_line():
    from awm_fast.families.flux import set_flux_attention

    with pytest.raises(ValueError, match="flash3 has no backward pass") as info:
        set_flux_attention(None, "flash3")
    assert "\n" not in str(info.value)


def test_policy_grid_is_the_dynamically_shifted_scheduler_grid(tmp_path, tiny_flux, monkeypatch):
    """FLUX: the scheduler's sigmas with mu from the packed image sequence length, as FluxPipeline sets them."""
    from awm_fast.sampling.timesteps import dynamic_grid, flux_mu
    from awm_fast.families.load import load_policy

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_flux)
    policy = load_policy(cfg, torch.device("cpu"), prompts=["a red cube"])
    side = policy.latent_shape[-1]
    pipe = load_flux_pipeline(str(tiny_flux), torch.float32)
    for n in (4, 14, 28):
        mu = flux_mu((side // 2) ** 2)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # as FluxPipeline calls it
        torch.testing.assert_close(policy.time_grid(n), pipe.scheduler.sigmas.double(), atol=0, rtol=0)
        torch.testing.assert_close(policy.time_grid(n), dynamic_grid(n, mu), atol=1e-6, rtol=0)


SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                     "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False}  # FLUX.1-schnell's scheduler_config.json


def _stepped_sigmas(pipe, n: int, resolution: int) -> list[float]:
    """The sigmas FluxPipeline itself steps through: the scheduler's sigma at each step, read in the step callback,
    then the final one."""
    seen = []

    def record(p, i, t, kwargs):
        seen.append(float(p.scheduler.sigmas[p.scheduler.step_index - 1]))
        return {}

    pipe(prompt="a red cube", height=resolution, width=resolution, num_inference_steps=n, guidance_scale=3.5,
         output_type="latent", max_sequence_length=16, callback_on_step_end=record,
         generator=torch.Generator().manual_seed(0))
    return seen + [float(pipe.scheduler.sigmas[-1])]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_policy_grid_is_the_grid_flux_pipeline_steps_through(tmp_path, tiny_flux, monkeypatch, variant):
    """schnell (no dynamic shifting, shift 1): FluxPipeline passes sigmas = linspace(1, 1/N, N), so 4 steps are
    1, .75, .5, .25, 0, not set_timesteps(4)'s 1, .667, .334, .001; dev: the same input sigmas shifted with mu."""
    import shutil

    from awm_fast.families.load import load_policy

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    path = tiny_flux
    if variant == "schnell":
        path = tmp_path / "schnell"
        shutil.copytree(tiny_flux, path)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHNELL_SCHEDULER))
    cfg = _cfg(tmp_path, path)
    policy = load_policy(cfg, torch.device("cpu"), prompts=["a red cube"])
    pipe = load_flux_pipeline(str(path), torch.float32)
    for n in (4, 6):
        stepped = torch.tensor(_stepped_sigmas(pipe, n, cfg.model.resolution), dtype=torch.float64)
        torch.testing.assert_close(policy.time_grid(n), stepped, atol=1e-7, rtol=0)
    if variant == "schnell":
        torch.testing.assert_close(policy.time_grid(4), torch.tensor([1, .75, .5, .25, 0], dtype=torch.float64))
